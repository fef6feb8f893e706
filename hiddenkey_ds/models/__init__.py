"""Models: loading a base model (hub, local, builtin:*) with optional 4-bit quantization and PEFT LoRA, the
builtin offline models, and the architecture shapes the planner reads.

    loading.py   load_model / load_tokenizer / resolve_model_path / lora_config
    builtin.py   builtin:tiny-llama, builtin:smollm2-135m-instruct (built once into a local cache)
    shapes.py    ModelShape of a config (no weights), for the memory planner
"""
