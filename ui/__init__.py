"""The sdlora Gradio app (``python -m ui``): a thin page over the sdlora library."""
