"""Form controls for TrainConfig options, made from `sdlora.forms.option_fields` (the config's metadata)."""

from __future__ import annotations

from typing import Any

import gradio as gr

from sdlora.forms import RANDOM_SEED, OptionField


def option_control(option: OptionField, value: Any) -> gr.components.Component:
    """The control for one option: a number box, checkbox, dropdown or text box, with the CLI's help."""
    elem_id = option.name.replace("_", "-")
    info = option.help
    if option.optional:
        info += " Empty or 0: the default." if option.kind in ("int", "float") else " Empty: the default."
    if option.name == "seed":
        info += f" {RANDOM_SEED}: a random seed (the one drawn is recorded in the run's settings)."
    if option.kind == "bool":
        return gr.Checkbox(bool(value), label=option.label, info=info, elem_id=elem_id)
    if option.kind == "choice":
        return gr.Dropdown(list(option.choices), value=value, label=option.label, info=info, elem_id=elem_id)
    if option.kind in ("int", "float"):
        return gr.Number(
            value,
            label=option.label,
            info=info,
            precision=0 if option.kind == "int" else None,
            elem_id=elem_id,
        )
    if option.kind == "lines":
        text = "\n".join(value or [])
        return gr.Textbox(text, label=option.label, info=f"{info} One per line.", lines=2, elem_id=elem_id)
    return gr.Textbox(value or "", label=option.label, info=info, elem_id=elem_id)


def option_value(option: OptionField, value: Any) -> Any:
    """A preset's value as its control shows it."""
    return "\n".join(value) if option.kind == "lines" else value
