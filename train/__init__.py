"""Fine-tuning VLMs on built datasets (`finer finetune`).

`sft` runs TRL's `SFTTrainer` with a PEFT LoRA plan; `families` says where each model family keeps its vision
tower, projector and language model and which chat template trains it; `data` turns built datasets into
conversations with every sample counted; `evaluate` scores a trained model's generations at the fine level;
`recipes/*.yaml` are ready-made configurations (`--config NAME`).
"""

import warnings

# PEFT (wrapping the model) and TRL (around generation) read `model.is_gradient_checkpointing`, which
# transformers 5 deprecates for `is_activation_checkpointing`: a FutureWarning on every training run about a
# call that is theirs, not ours. Only that warning is hidden, and only once training code is imported.
warnings.filterwarnings(
    "ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning
)
