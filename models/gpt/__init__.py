"""The gpt model: spec.py, torch_impl.py, tf_impl.py."""
