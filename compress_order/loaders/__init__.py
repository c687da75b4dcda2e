"""Models and datasets named by `_target_` in conf/model and conf/data: Hugging Face causal LMs, timm classifiers, text and image data."""
