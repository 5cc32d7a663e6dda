"""The HF architecture this plugin converts (config.json ``architectures[0]``)."""

ARCHITECTURE = "Step3p7ForConditionalGeneration"
