"""The training loop's parts, distributed training and FSDP."""
