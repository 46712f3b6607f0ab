"""Model stage: the base dual encoder, LoRA on both towers, and adapter files.

- factory: `create_model` (open_clip names and tags, local checkpoints, timm/HF towers, mmft-mini);
- lora: the LoRA layers, their state on a model, scale and merge;
- adapter: adapter-only files (safetensors + JSON), identity checks, `load_model(run_dir)`, `export`.
- identity: when two recorded base identities name the same base (every identity check asks it).
"""
