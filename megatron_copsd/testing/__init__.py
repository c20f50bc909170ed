"""Helpers for tests and demos: tiny random HF models and real multi-process gloo launches."""
