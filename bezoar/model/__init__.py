"""bezoar.model: the OpenLLaMA (Llama) forward pass, checkpoints, tokenizer, decoding."""
