"""Publishing on the Hugging Face Hub: dataset and adapter uploads and their cards."""
