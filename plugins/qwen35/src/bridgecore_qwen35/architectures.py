"""The HF architectures this plugin converts (config.json ``architectures[0]``)."""

#: text-only classes keep the decoder under `model.`; the VL classes nest it (`model.language_model.`).
TEXT_ARCHITECTURES = ("Qwen3_5ForCausalLM", "Qwen3_5MoeForCausalLM")
VL_ARCHITECTURES = ("Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration")
ARCHITECTURES = TEXT_ARCHITECTURES + VL_ARCHITECTURES
