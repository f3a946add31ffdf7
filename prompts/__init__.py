"""Prompt templates (Jinja) shipped as package data; see finer.prompts."""
