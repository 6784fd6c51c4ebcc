"""distllama: tensor- and pipeline-parallel inference for Hugging Face Llama checkpoints."""

__version__ = "0.1.0"
