"""LoRA training for Stable Diffusion product styles (`product-studio train-lora`)."""
