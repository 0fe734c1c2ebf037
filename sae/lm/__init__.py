"""The language-model side: loading HF models, sites (where activations are read), capture and splicing,
tokenization."""
