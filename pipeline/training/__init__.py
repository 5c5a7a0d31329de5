"""Training the fine-tuned branch: model, loss, held-out selection, the train and sweep-train stages."""
