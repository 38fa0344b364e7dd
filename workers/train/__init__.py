"""Fine-tuning: the retrieval network and losses (pure), the training loop, the fine-tuning report."""
