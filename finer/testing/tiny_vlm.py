"""Tiny random-weight VLMs of the real families, built offline in seconds for tests and the demo.

Each builder writes a folder that loads like a Hub checkpoint (`AutoProcessor`, `AutoModelForImageTextToText`)
with the family's real architecture, special tokens and chat template, so the production code paths (processor
image-token expansion, TRL's chat-template recognition, PEFT module names) are the ones tests exercise. Only
sizes and weights are fake; the tokenizer is a byte-level BPE trained in-process on a small built-in corpus.

Images go inside the content blocks of the conversation, as transformers' processors read them from there:

    messages = [{"role": "user", "content": [{"type": "image", "image": tiny_image()},
                                             {"type": "text", "text": "What bird is this?"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    model.generate(**inputs, max_new_tokens=8)

A bare `{"type": "image"}` placeholder also works when the images are passed as
`processor_kwargs={"images": [pil]}` (TRL's collators render the template first and call the processor with
`images=` themselves, which is equivalent).
"""

from __future__ import annotations

import atexit
import contextlib
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from functools import cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessorPil,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    GenerationConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
)
from transformers.utils import is_torchvision_available

#: One tiny model per family of the registry (`finer.models.families.FAMILIES`), named by the `model_type` of
#: its config; `TINY_FOR_FAMILY` maps each registry family to its tiny model.
TINY_FAMILIES: tuple[str, ...] = (
    "llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics3", "gemma3",
)  # fmt: skip
#: Registry family name (`Family.name`) -> tiny model. A test fails when a registry family is missing here.
TINY_FOR_FAMILY: dict[str, str] = {
    "llava-1.5": "llava",
    "llava-next": "llava_next",
    "qwen2-vl": "qwen2_vl",
    "qwen2.5-vl": "qwen2_5_vl",
    "qwen3-vl": "qwen3_vl",
    "idefics3": "idefics3",
    "gemma3": "gemma3",
}
#: The families whose transformers processor loads a video processor, which needs torchvision.
NEEDS_TORCHVISION: frozenset[str] = frozenset({"qwen2_vl", "qwen2_5_vl", "qwen3_vl"})

# The families' published templates, byte for byte: TRL recognises a model by exact equality of its chat
# template (trl/chat_template_utils.py, get_training_chat_template), so any drift would take the tiny models
# off the path the real ones follow.
#: llava-hf/llava-1.5-*-hf. Already carries {% generation %} markers, so TRL uses it as is.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
#: Qwen/Qwen2-VL-*-Instruct, byte-identical to Qwen2.5-VL's (TRL's qwen2_5_vl.jinja).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
#: HuggingFaceTB/SmolVLM-*-Instruct, Idefics3ForConditionalGeneration checkpoints (TRL's smolvlm.jinja).
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
#: llava-hf/llava-v1.6-mistral-7b-hf (TRL's llava_next.jinja): Mistral's [INST] turns, no generation prompt.
LLAVA_NEXT_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<<SYS>>\n"
    "' + message['content'][0]['text'] + '\n"
    "<</SYS>>\n"
    "\n"
    "' }}{% elif message['role'] == 'user' %}{{ '[INST] ' }}{# Render all images first #}{% for"
    " content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n"
    "' }}{% endfor %}{# Render all text next #}{% for content in message['content'] |"
    " selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}{{' [/INST]' }}{%"
    " elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '</s> '}}{%"
    " else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{%"
    " endfor %}"
)
#: Qwen/Qwen2.5-VL-*-Instruct: the same bytes as Qwen2-VL's.
QWEN2_5_VL_CHAT_TEMPLATE = QWEN2_VL_CHAT_TEMPLATE
#: Qwen/Qwen3-VL-*-Instruct (TRL's qwen3_vl.jinja): no default system turn, tool calls.
QWEN3_VL_CHAT_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0].role == 'system' %}\n"
    "        {%- if messages[0].content is string %}\n"
    "            {{- messages[0].content }}\n"
    "        {%- else %}\n"
    "            {%- for content in messages[0].content %}\n"
    "                {%- if 'text' in content %}\n"
    "                    {{- content.text }}\n"
    "                {%- endif %}\n"
    "            {%- endfor %}\n"
    "        {%- endif %}\n"
    "        {{- '\\n\\n' }}\n"
    "    {%- endif %}\n"
    '    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou'
    ' are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n'
    "    {%- for tool in tools %}\n"
    '        {{- "\\n" }}\n'
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and'
    ' arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>,'
    ' \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n'
    "{%- else %}\n"
    "    {%- if messages[0].role == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' }}\n"
    "        {%- if messages[0].content is string %}\n"
    "            {{- messages[0].content }}\n"
    "        {%- else %}\n"
    "            {%- for content in messages[0].content %}\n"
    "                {%- if 'text' in content %}\n"
    "                    {{- content.text }}\n"
    "                {%- endif %}\n"
    "            {%- endfor %}\n"
    "        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- set image_count = namespace(value=0) %}\n"
    "{%- set video_count = namespace(value=0) %}\n"
    "{%- for message in messages %}\n"
    '    {%- if message.role == "user" %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' }}\n"
    "        {%- if message.content is string %}\n"
    "            {{- message.content }}\n"
    "        {%- else %}\n"
    "            {%- for content in message.content %}\n"
    "                {%- if content.type == 'image' or 'image' in content or 'image_url' in content"
    " %}\n"
    "                    {%- set image_count.value = image_count.value + 1 %}\n"
    "                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}\n"
    "                    <|vision_start|><|image_pad|><|vision_end|>\n"
    "                {%- elif content.type == 'video' or 'video' in content %}\n"
    "                    {%- set video_count.value = video_count.value + 1 %}\n"
    "                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}\n"
    "                    <|vision_start|><|video_pad|><|vision_end|>\n"
    "                {%- elif 'text' in content %}\n"
    "                    {{- content.text }}\n"
    "                {%- endif %}\n"
    "            {%- endfor %}\n"
    "        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' }}\n"
    "        {%- if message.content is string %}\n"
    "            {{- message.content }}\n"
    "        {%- else %}\n"
    "            {%- for content_item in message.content %}\n"
    "                {%- if 'text' in content_item %}\n"
    "                    {{- content_item.text }}\n"
    "                {%- endif %}\n"
    "            {%- endfor %}\n"
    "        {%- endif %}\n"
    "        {%- if message.tool_calls %}\n"
    "            {%- for tool_call in message.tool_calls %}\n"
    "                {%- if (loop.first and message.content) or (not loop.first) %}\n"
    "                    {{- '\\n' }}\n"
    "                {%- endif %}\n"
    "                {%- if tool_call.function %}\n"
    "                    {%- set tool_call = tool_call.function %}\n"
    "                {%- endif %}\n"
    '                {{- \'<tool_call>\\n{"name": "\' }}\n'
    "                {{- tool_call.name }}\n"
    '                {{- \'", "arguments": \' }}\n'
    "                {%- if tool_call.arguments is string %}\n"
    "                    {{- tool_call.arguments }}\n"
    "                {%- else %}\n"
    "                    {{- tool_call.arguments | tojson }}\n"
    "                {%- endif %}\n"
    "                {{- '}\\n</tool_call>' }}\n"
    "            {%- endfor %}\n"
    "        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {%- if message.content is string %}\n"
    "            {{- message.content }}\n"
    "        {%- else %}\n"
    "            {%- for content in message.content %}\n"
    "                {%- if content.type == 'image' or 'image' in content or 'image_url' in content"
    " %}\n"
    "                    {%- set image_count.value = image_count.value + 1 %}\n"
    "                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}\n"
    "                    <|vision_start|><|image_pad|><|vision_end|>\n"
    "                {%- elif content.type == 'video' or 'video' in content %}\n"
    "                    {%- set video_count.value = video_count.value + 1 %}\n"
    "                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}\n"
    "                    <|vision_start|><|video_pad|><|vision_end|>\n"
    "                {%- elif 'text' in content %}\n"
    "                    {{- content.text }}\n"
    "                {%- endif %}\n"
    "            {%- endfor %}\n"
    "        {%- endif %}\n"
    "        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)
#: google/gemma-3-*-it (TRL's gemma3.jinja): renders BOS itself, the assistant's role is "model".
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n"
    "\n"
    "' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n"
    "\n"
    "' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    '    {%- set first_user_prefix = "" -%}\n'
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '        {{ raise_exception("Conversation roles must alternate'
    ' user/assistant/user/assistant/...") }}\n'
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    '        {%- set role = "model" -%}\n'
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n"
    '\' + (first_user_prefix if loop.first else "") }}\n'
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    '        {{ raise_exception("Invalid content type") }}\n'
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n"
    "' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n"
    "'}}\n"
    "{%- endif -%}\n"
)
CHAT_TEMPLATES: dict[str, str] = {
    "llava": LLAVA_CHAT_TEMPLATE,
    "llava_next": LLAVA_NEXT_CHAT_TEMPLATE,
    "qwen2_vl": QWEN2_VL_CHAT_TEMPLATE,
    "qwen2_5_vl": QWEN2_5_VL_CHAT_TEMPLATE,
    "qwen3_vl": QWEN3_VL_CHAT_TEMPLATE,
    "idefics3": SMOLVLM_CHAT_TEMPLATE,
    "gemma3": GEMMA3_CHAT_TEMPLATE,
}

_VOCAB_SIZE = 1024
_TEXT = {  # the language model: Llama (LLaVA, Idefics3) or Qwen2 (Qwen2-VL), all this size
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
}
_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
_IMAGE_SIZE = 32  # pixels fed to the CLIP / SigLIP towers
_PATCH = 8  # -> (32 / 8)^2 = 16 patches

_SUBJECTS = (
    "Black footed Albatross", "Laysan Albatross", "Cerulean Warbler", "Black throated Blue Warbler",
    "Great Horned Owl", "Barn Owl", "Pine Grosbeak", "Bewick's Wren", "Western Gull", "Common Tern",
    "Northern Cardinal", "Blue Jay", "American Crow", "Ruby throated Hummingbird", "Painted Bunting",
    "Boeing 737-800", "Airbus A320", "Cessna 172", "F/A-18", "An-12", "Douglas DC-3",
    "Chihuahua", "Shih-Tzu", "curly-coated retriever", "Golden Retriever", "Siberian Husky", "Beagle",
    "Acura RL Sedan 2012", "Ford F-150 Regular Cab 2007", "BMW M3 Coupe 2012", "Honda Odyssey Minivan 2012",
)  # fmt: skip
_GROUPS = (
    "bird", "albatross", "warbler", "owl", "finch", "wren", "gull", "tern", "cardinal", "jay", "hummingbird",
    "airplane", "aircraft", "Boeing", "Airbus", "Cessna", "dog", "retriever", "terrier", "hound",
    "car", "sedan", "SUV", "coupe", "convertible", "pickup", "hatchback", "van",
)  # fmt: skip
_ATTRIBUTES = (
    "black head", "white belly", "blue back", "yellow throat", "red crown", "orange beak", "long tail",
    "short wings", "striped breast", "spotted wings", "curved bill", "webbed feet", "two engines",
    "swept wings", "high tail", "four doors", "round headlights", "curly coat", "pointed ears", "brown eyes",
)  # fmt: skip
_SENTENCES = (
    "What is the name of the {g} in this image? Answer: {s}.",
    "Which visible attributes does the {g} have? Attributes: {a}, {b}.",
    "Now, which {g} is it? Answer after 'Answer:'. Answer: {s}",
    "This is a photo of a {s}, a kind of {g} with {a} and {b}.",
    "The {s} is a {g}. It has {a}, and often {b}.",
    "Describe the image. The {g} shows {a} and {b}; it is the {s}.",
    "Is this a {s} or another {g}? I see {a}.",
)
_EXTRA = (
    "You are a helpful assistant.",
    "Choose one option: (A) (B) (C) (D) (E). The answer is B.",
    "0 1 2 3 4 5 6 7 8 9 10 100 2024 none unknown yes no",
)
Turns = Sequence[tuple[str, str, str]]
# (first user, assistant, next user) text, as the three templates lay turns out between their special tokens
_TURNS: Turns = (
    ("USER: ", " ASSISTANT: ", " USER: "),
    ("User: ", "\nAssistant: ", "\nUser: "),
    ("system\nYou are a helpful assistant.\nuser\n", "\nassistant\n", "\nuser\n"),
)
# The same for LLaVA-NeXT's Mistral turns and Gemma 3's, whose tokenizers are trained on these instead.
_INST_TURNS: Turns = (("[INST] ", " [/INST] ", " [INST] "),)
_GEMMA_TURNS: Turns = (("user\n", "\nmodel\n", "\nuser\n"),)


def _corpus(turns: Turns = _TURNS) -> list[str]:
    """A few thousand words of the domain's English in the templates' turn layouts, so common words and the
    role names become single tokens, split as the rendered conversations split them."""
    rng = random.Random(0)

    def question(subject: str) -> str:
        a, b = rng.sample(_ATTRIBUTES, 2)
        return rng.choice(_SENTENCES).format(s=subject, g=rng.choice(_GROUPS), a=a, b=b)

    lines = list(_EXTRA)
    for subject in _SUBJECTS * 8:
        user, assistant, next_user = rng.choice(turns)
        lines.append(f"{user}{question(subject)}{assistant}{subject}.{next_user}{question(subject)}")
    return lines


def _train_tokenizer(
    special_tokens: list[str],
    *,
    bos: str | None,
    eos: str,
    pad: str,
    unk: str,
    add_bos: bool,
    turns: Turns = _TURNS,
    named_tokens: dict[str, str] | None = None,
) -> PreTrainedTokenizerFast:
    """Byte-level BPE (any text encodes, no unknowns) with the family's special tokens as single tokens.

    Qwen2 and SmolLM ship byte-level BPEs too; Llama's is a SentencePiece BPE, which splits the templates'
    words much the same way (a leading space joins the next word). `add_bos` prepends `bos` when encoding with
    special tokens, as Llama's tokenizer (LLaVA) does. `named_tokens` become tokenizer attributes
    (`tokenizer.image_token`, `tokenizer.image_token_id`), as Gemma 3's processor reads them.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(turns), trainer)
    byte_level = processors.ByteLevel(trim_offsets=False)
    if add_bos:
        assert bos is not None
        bos_template = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
        )
        tokenizer.post_processor = processors.Sequence([byte_level, bos_template])
    else:
        tokenizer.post_processor = byte_level
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        model_max_length=_TEXT["max_position_embeddings"],
        **(named_tokens or {}),
    )


def _text_config(tokenizer: PreTrainedTokenizerFast) -> dict[str, object]:
    """The language model's config: `_TEXT` sized, with the tokenizer's vocabulary and special ids."""
    return {
        **_TEXT,
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _llava() -> tuple[PreTrainedModel, ProcessorMixin]:
    """LLaVA-1.5 as llava-hf ships it: CLIP tower, 2-layer GELU projector, Llama, CLS dropped ("default")."""
    tokenizer = _train_tokenizer(
        ["<unk>", "<s>", "</s>", "<image>", "<pad>"],
        bos="<s>",
        eos="</s>",
        pad="<pad>",
        unk="<unk>",
        add_bos=True,
    )
    image_token = "<image>"
    num_patches = (_IMAGE_SIZE // _PATCH) ** 2
    config = LlavaConfig(
        vision_config={
            "model_type": "clip_vision_model",
            **_VISION,
            "image_size": _IMAGE_SIZE,
            "patch_size": _PATCH,
            "projection_dim": _VISION["hidden_size"],
        },
        text_config={"model_type": "llama", **_text_config(tokenizer)},
        image_token_index=tokenizer.convert_tokens_to_ids(image_token),
        image_seq_length=num_patches,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": _IMAGE_SIZE}, crop_size={"height": _IMAGE_SIZE, "width": _IMAGE_SIZE}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=_PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS, dropped again by the "default" strategy
        chat_template=LLAVA_CHAT_TEMPLATE,
        image_token=image_token,
    )
    return LlavaForConditionalGeneration(config), processor


#: LLaVA-NeXT's anyres tiles, tiny: a 32x32 image is one tile plus the base view, a 32x64 one two tiles.
_PINPOINTS = [[_IMAGE_SIZE, _IMAGE_SIZE], [_IMAGE_SIZE, 2 * _IMAGE_SIZE], [2 * _IMAGE_SIZE, _IMAGE_SIZE]]


def _llava_next() -> tuple[PreTrainedModel, ProcessorMixin]:
    """LLaVA-NeXT as llava-hf/llava-v1.6-mistral-7b-hf ships it: CLIP tower, anyres tiling over
    `image_grid_pinpoints` (base view + tiles, a learnt newline after each row), Mistral, CLS dropped."""
    tokenizer = _train_tokenizer(
        ["<unk>", "<s>", "</s>", "<image>", "<pad>"],
        bos="<s>",
        eos="</s>",
        pad="<pad>",
        unk="<unk>",
        add_bos=True,
        turns=_INST_TURNS,
    )
    image_token = "<image>"
    config = LlavaNextConfig(
        vision_config={
            "model_type": "clip_vision_model",
            **_VISION,
            "image_size": _IMAGE_SIZE,
            "patch_size": _PATCH,
            "projection_dim": _VISION["hidden_size"],
        },
        text_config={"model_type": "mistral", **_text_config(tokenizer)},
        image_token_index=tokenizer.convert_tokens_to_ids(image_token),
        image_grid_pinpoints=_PINPOINTS,
        image_seq_length=(_IMAGE_SIZE // _PATCH) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": _IMAGE_SIZE},
        crop_size={"height": _IMAGE_SIZE, "width": _IMAGE_SIZE},
        image_grid_pinpoints=_PINPOINTS,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=_PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_NEXT_CHAT_TEMPLATE,
        image_token=image_token,
    )
    return LlavaNextForConditionalGeneration(config), processor


_QWEN2_VL_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip


def _qwen_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen2's byte-level BPE layout: no BOS, `<|im_end|>` ends a turn, `<|endoftext|>` pads."""
    return _train_tokenizer(
        _QWEN2_VL_SPECIALS,
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        unk="<|endoftext|>",
        add_bos=False,
    )


def _qwen_vision_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """The image, video and vision start/end token ids every Qwen-VL config carries."""
    ids = tokenizer.convert_tokens_to_ids
    return {
        "image_token_id": ids("<|image_pad|>"),
        "video_token_id": ids("<|video_pad|>"),
        "vision_start_token_id": ids("<|vision_start|>"),
        "vision_end_token_id": ids("<|vision_end|>"),
    }


def qwen2_vl_parts() -> tuple[PreTrainedModel, PreTrainedTokenizerFast, Qwen2VLImageProcessorPil]:
    """The tiny Qwen2-VL's model, tokenizer and image processor, none needing torchvision (transformers'
    `Qwen2VLProcessor` does, through its video processor). Qwen2-VL: 14-px patches merged 2x2, M-RoPE; the
    pixel bounds keep a small image at 4 to 16 image tokens."""
    tokenizer = _qwen_tokenizer()
    config = Qwen2VLConfig(
        text_config={
            "model_type": "qwen2_vl_text",
            **_text_config(tokenizer),
            # M-RoPE splits each head's rotary half (head_dim 16 / 2) into temporal, height, width sections.
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
        },
        vision_config={
            "depth": _VISION["num_hidden_layers"],
            "embed_dim": _VISION["hidden_size"],
            "num_heads": _VISION["num_attention_heads"],
            "mlp_ratio": 2,
            "hidden_size": _TEXT["hidden_size"],  # the merger projects straight into the LM's width
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        **_qwen_vision_ids(tokenizer),
    )
    image_processor = Qwen2VLImageProcessorPil(**_QWEN2_VL_PIXELS)
    return Qwen2VLForConditionalGeneration(config), tokenizer, image_processor


_QWEN2_VL_PIXELS = {"min_pixels": 56 * 56, "max_pixels": 112 * 112}


def _qwen2_vl() -> tuple[PreTrainedModel, ProcessorMixin]:
    from transformers import Qwen2VLVideoProcessor  # a stub that raises on use when torchvision is missing

    model, tokenizer, image_processor = qwen2_vl_parts()
    processor = Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**_QWEN2_VL_PIXELS),
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )
    return model, processor


def _qwen2_5_vl() -> tuple[PreTrainedModel, ProcessorMixin]:
    """Qwen2.5-VL: Qwen2-VL's 14-px patches and 2x2 merge, an RMSNorm/SwiGLU tower with window attention
    (`fullatt_block_indexes` lists the full-attention layers: here the last of two), M-RoPE."""
    from transformers import Qwen2VLVideoProcessor  # a stub that raises on use when torchvision is missing

    tokenizer = _qwen_tokenizer()
    config = Qwen2_5_VLConfig(
        text_config={
            "model_type": "qwen2_5_vl_text",
            **_text_config(tokenizer),
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
        },
        vision_config={
            "depth": _VISION["num_hidden_layers"],
            "hidden_size": _VISION["hidden_size"],
            "intermediate_size": _VISION["intermediate_size"],
            "num_heads": _VISION["num_attention_heads"],
            "out_hidden_size": _TEXT["hidden_size"],
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,  # pixels: 2x2 merged units, half of a 4x4-unit image
            "fullatt_block_indexes": [_VISION["num_hidden_layers"] - 1],
        },
        **_qwen_vision_ids(tokenizer),
    )
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessorPil(**_QWEN2_VL_PIXELS),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**_QWEN2_VL_PIXELS),
        chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
    )
    return Qwen2_5_VLForConditionalGeneration(config), processor


# Qwen3-VL: 16-px patches merged 2x2 (32-px units); the bounds keep a small image at 4 to 16 image tokens.
_QWEN3_VL_PIXELS = {"min_pixels": 64 * 64, "max_pixels": 128 * 128}
_QWEN3_VL_IMAGE = {
    "patch_size": 16,
    "merge_size": 2,
    "temporal_patch_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}


def _qwen3_vl() -> tuple[PreTrainedModel, ProcessorMixin]:
    """Qwen3-VL: SigLIP-2-like tower with learnt (interpolated) position embeddings, DeepStack mergers that
    feed vision layers `deepstack_visual_indexes` into the first LLM layers, interleaved M-RoPE, Qwen3 LM."""
    from transformers import Qwen3VLVideoProcessor  # a stub that raises on use when torchvision is missing

    tokenizer = _qwen_tokenizer()
    head_dim = _TEXT["hidden_size"] // _TEXT["num_attention_heads"]
    config = Qwen3VLConfig(
        text_config={
            "model_type": "qwen3_vl_text",
            **_text_config(tokenizer),
            "head_dim": head_dim,  # Qwen3 sets it explicitly (default 128)
            # Qwen3-VL-*'s [24, 20, 20] of 64 rotary pairs, scaled to head_dim 16's 8 pairs.
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5e6,
                "mrope_section": [4, 2, 2],
                "mrope_interleaved": True,
            },
        },
        vision_config={
            "depth": _VISION["num_hidden_layers"],
            "hidden_size": _VISION["hidden_size"],
            "intermediate_size": _VISION["intermediate_size"],
            "num_heads": _VISION["num_attention_heads"],
            "out_hidden_size": _TEXT["hidden_size"],
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "num_position_embeddings": 64,  # an 8x8 grid, interpolated to the image's patch grid
            # The real ones tap three intermediate layers of 24-27; both of the two here exist.
            "deepstack_visual_indexes": list(range(_VISION["num_hidden_layers"])),
        },
        **_qwen_vision_ids(tokenizer),
    )
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessorPil(**_QWEN3_VL_IMAGE, **_QWEN3_VL_PIXELS),
        tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(
            **_QWEN3_VL_IMAGE,
            size={
                "shortest_edge": _QWEN3_VL_PIXELS["min_pixels"],
                "longest_edge": 4 * _QWEN3_VL_PIXELS["max_pixels"],
            },
        ),
        chat_template=QWEN3_VL_CHAT_TEMPLATE,
    )
    return Qwen3VLForConditionalGeneration(config), processor


def _idefics3() -> tuple[PreTrainedModel, ProcessorMixin]:
    """SmolVLM-Instruct, an Idefics3 model: SigLIP tower, pixel-shuffle connector, Llama; images not split."""
    grid_tokens = [f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)]
    tokenizer = _train_tokenizer(
        [
            "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<fake_token_around_image>", "<image>",
            "<end_of_utterance>", "<global-img>", *grid_tokens,
        ],
        bos="<|im_start|>",
        eos="<end_of_utterance>",
        pad="<|im_end|>",
        unk="<|endoftext|>",
        add_bos=False,
    )  # fmt: skip
    scale_factor = 2
    image_seq_len = (_IMAGE_SIZE // _PATCH) ** 2 // scale_factor**2
    config = Idefics3Config(
        vision_config={**_VISION, "image_size": _IMAGE_SIZE, "patch_size": _PATCH},
        text_config={"model_type": "llama", **_text_config(tokenizer)},
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=scale_factor,
        pad_token_id=tokenizer.pad_token_id,
    )
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False,
        size={"longest_edge": _IMAGE_SIZE},
        max_image_size={"longest_edge": _IMAGE_SIZE},
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=image_seq_len,
        chat_template=SMOLVLM_CHAT_TEMPLATE,
    )
    return Idefics3ForConditionalGeneration(config), processor


def _gemma3() -> tuple[PreTrainedModel, ProcessorMixin]:
    """Gemma 3 (google/gemma-3-*-it): SigLIP tower without its pooling head, patches average-pooled to
    `mm_tokens_per_image` soft tokens between `<start_of_image>` and `<end_of_image>`, Gemma 3 LM with
    alternating sliding-window and global layers. Generation stops at `<end_of_turn>`, as the real one's
    does."""
    tokenizer = _train_tokenizer(
        [
            "<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
            "<start_of_image>", "<end_of_image>", "<image_soft_token>",
        ],
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        unk="<unk>",
        add_bos=True,
        turns=_GEMMA_TURNS,
        named_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    )  # fmt: skip
    ids = tokenizer.convert_tokens_to_ids
    patches_per_side = _IMAGE_SIZE // _PATCH  # 4 -> pooled 2x2 -> 4 image tokens
    mm_tokens_per_image = (patches_per_side // 2) ** 2
    head_dim = _TEXT["hidden_size"] // _TEXT["num_attention_heads"]
    config = Gemma3Config(
        text_config={
            "model_type": "gemma3_text",
            **_text_config(tokenizer),
            "head_dim": head_dim,
            "query_pre_attn_scalar": head_dim,
            "sliding_window": 512,
            "layer_types": ["sliding_attention", "full_attention"],
        },
        vision_config={
            "model_type": "siglip_vision_model",
            **_VISION,
            "image_size": _IMAGE_SIZE,
            "patch_size": _PATCH,
            "vision_use_head": False,
        },
        mm_tokens_per_image=mm_tokens_per_image,
        boi_token_index=ids("<start_of_image>"),
        eoi_token_index=ids("<end_of_image>"),
        image_token_index=ids("<image_soft_token>"),
    )
    image_processor = Gemma3ImageProcessorPil(
        size={"height": _IMAGE_SIZE, "width": _IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_pan_and_scan=False,
    )
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=GEMMA3_CHAT_TEMPLATE,
        image_seq_length=mm_tokens_per_image,
    )
    model = Gemma3ForConditionalGeneration(config)
    # transformers starts the projection at zero (a checkpoint replaces it): left so, the image would never
    # reach the language model and the vision tower would get no gradient, unlike the real Gemma 3.
    projection = model.model.multi_modal_projector.mm_input_projection_weight
    torch.nn.init.normal_(projection, std=config.text_config.initializer_range)
    return model, processor


def _tiny_name(family: str) -> str:
    """A tiny model's name, given itself or its registry family's name (`"qwen2.5-vl"` -> `"qwen2_5_vl"`)."""
    name = TINY_FOR_FAMILY.get(family, family)
    if name not in _BUILDERS:
        known = ", ".join(f"{f} ({t})" for f, t in TINY_FOR_FAMILY.items())
        raise ValueError(f"unknown tiny VLM family {family!r}; choose one of {known}")
    return name


def unavailable_reason(family: str) -> str | None:
    """Why `family` (a tiny model or registry family name) cannot be built or loaded here, or None when it can
    (for test skips)."""
    name = TINY_FOR_FAMILY.get(family, family)
    if name in NEEDS_TORCHVISION and not is_torchvision_available():
        return (
            f"{name} needs torchvision: transformers' Qwen-VL processors always load a video processor, "
            "and video processors require torchvision"
        )
    return None


_BUILDERS: dict[str, Callable[[], tuple[PreTrainedModel, ProcessorMixin]]] = {
    "llava": _llava,
    "llava_next": _llava_next,
    "qwen2_vl": _qwen2_vl,
    "qwen2_5_vl": _qwen2_5_vl,
    "qwen3_vl": _qwen3_vl,
    "idefics3": _idefics3,
    "gemma3": _gemma3,
}
#: Tokens that end generation besides the tokenizer's EOS, as in the real checkpoints' generation configs.
_STOP_TOKENS: dict[str, tuple[str, ...]] = {"gemma3": ("<end_of_turn>",)}


def build_tiny_vlm(family: str, out_dir: Path, *, seed: int = 0) -> Path:
    """Build a random-weight VLM of `family` (one of `TINY_FAMILIES`, or a registry family name as in
    `TINY_FOR_FAMILY`); save it and its processor in `out_dir`.

    The weights depend only on `seed` (the global torch RNG is left as it was). The folder holds safetensors,
    config, generation config and processor files, and loads offline with `AutoProcessor.from_pretrained` and
    `AutoModelForImageTextToText.from_pretrained`. Returns `out_dir`.
    """
    name = _tiny_name(family)
    if reason := unavailable_reason(name):
        raise ImportError(reason)
    out_dir = Path(out_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, processor = _BUILDERS[name]()
    tokenizer = processor.tokenizer
    stops = [tokenizer.convert_tokens_to_ids(t) for t in _STOP_TOKENS.get(name, ())]
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, *stops] if stops else tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with _quiet_progress():  # a tiny model's one shard needs no progress bar in a test's or user's output
        model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


@cache
def _cache_dir() -> Path:
    root = Path(tempfile.mkdtemp(prefix="finer-tiny-vlm-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


def tiny_vlm_path(family: str) -> Path:
    """The folder of `family`'s tiny VLM (seed 0), built on first use and shared for the rest of the process;
    `family` is a tiny model's name or its registry family's (`"llava"` or `"llava-1.5"`: the same folder).

    Treat it as read-only: every caller gets the same folder. It is deleted when the process exits.
    """
    return _tiny_vlm_path(_tiny_name(family))


@cache
def _tiny_vlm_path(name: str) -> Path:
    return build_tiny_vlm(name, _cache_dir() / name)


def tiny_image(seed: int = 0, size: int = 32) -> Image.Image:
    """A `size`x`size` RGB image of seeded noise: deterministic, distinct per seed, no files needed."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)
