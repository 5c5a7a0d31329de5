"""Inputs: datasets and their crop protocol (base, datasets, views, demo), backbones and their weights (specs, weights, backbones)."""
