"""Optional integrations; each module imports its framework only when it is itself imported:

- memcore.integrations.lightning: MemcoreCallback for PyTorch Lightning
- memcore.integrations.huggingface: MemcoreCallback and MemcoreTrainer for transformers' Trainer
"""
