"""The Megatron side: configs, specs and model building, process groups, torch_dist and training runs."""
