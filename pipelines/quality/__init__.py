"""Evaluation (nDCG, MRR, recall on BEIR collections) and fine-tuning of both models on the user's judgments."""
