"""LoRA training for Stable Diffusion product styles (`product-studio train-lora`).

Modules (import them directly; this package imports nothing heavy):

- :mod:`lora.config`: :class:`~lora.config.TrainConfig`, every training option, validated.
- :mod:`lora.dataset`: images + captions (kohya folders or ``metadata.jsonl``), buckets, masks.
- :mod:`lora.train`: the trainer (peft LoRA on fresh diffusers components), checkpoints, resume.
- :mod:`lora.export`: diffusers and kohya/A1111 files, the manifest, the rules snippet.
- :mod:`lora.caption`: BLIP captions for a dataset (`product-studio caption`).
- :mod:`lora.generate`: text-to-image product visuals with LoRAs (`product-studio generate`).
- :mod:`lora.apply`: LoRAs on the registry's shared pipelines for one call; a LoRA's tag.
"""
