"""Fine-tuning VLMs on built datasets (`finer finetune`).

`sft` runs TRL's `SFTTrainer` with a PEFT LoRA plan; `families` says where each model family keeps its vision
tower, projector and language model and which chat template trains it; `data` turns built datasets into
conversations with every sample counted; `evaluate` scores a trained model's generations at the fine level;
`recipes/*.yaml` are ready-made configurations (`--config NAME`).
"""
