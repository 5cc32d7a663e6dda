"""The Hugging Face side: config.json, lazy sliced reading and streaming sharded writing of safetensors."""
