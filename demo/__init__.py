"""phimm's Gradio web demo."""
