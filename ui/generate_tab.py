"""The Generate tab: a prompt, stacked adapters with weights, and Generate / Compare / Sweep."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import gradio as gr

from sdlora.adapters.library import adapter_names
from sdlora.config import GenerateConfig, option_choices, option_default, option_help, parse_weights
from sdlora.generate.studio import Result, make_params
from ui.common import USER_ERRORS, AppContext, problem

ADAPTER_ROWS = 4
SIZES = ["native", "256x256", "512x512", "512x768", "768x512", "768x768", "1024x1024"]
MAX_SEED = 2**31 - 1


def chosen_adapters(rows: Sequence) -> list[tuple[str, float]]:
    """(name, weight) of each adapter row that is switched on and has an adapter picked.

    `rows` is the page's flat list of row values: name, on, weight for each row in turn."""
    triples = [rows[index : index + 3] for index in range(0, len(rows), 3)]
    return [(name, float(weight)) for name, on, weight in triples if on and name]


def build_generate_tab(ctx: AppContext, base_box: gr.Textbox, tab: gr.Tab) -> None:
    """Lay out the tab inside the current Blocks; the adapter lists refresh whenever the tab is opened."""
    with gr.Row(equal_height=False):
        with gr.Column(scale=2):
            prompt = gr.Textbox(
                label="Prompt", lines=2, info=option_help(GenerateConfig, "prompt"), elem_id="prompt"
            )
            negative = gr.Textbox(
                label="Negative prompt", info=option_help(GenerateConfig, "negative_prompt")
            )
            with gr.Row():
                seed = gr.Number(
                    option_default(GenerateConfig, "seed"), label="Seed", precision=0, minimum=0, scale=3
                )
                dice = gr.Button("Random", scale=1, min_width=80, elem_id="dice")
                steps = gr.Slider(
                    1,
                    100,
                    option_default(GenerateConfig, "steps"),
                    step=1,
                    label="Steps",
                    scale=4,
                    elem_id="gen-steps",
                )
            with gr.Row():
                guidance = gr.Slider(
                    0,
                    20,
                    option_default(GenerateConfig, "guidance"),
                    step=0.5,
                    label="Guidance",
                    info=option_help(GenerateConfig, "guidance"),
                )
                size = gr.Dropdown(
                    SIZES,
                    value="native",
                    allow_custom_value=True,
                    label="Size (WxH)",
                    info="native: the base model's own size; or type e.g. 640x512.",
                )
                scheduler = gr.Dropdown(
                    option_choices(GenerateConfig, "scheduler"),
                    value=option_default(GenerateConfig, "scheduler"),
                    label="Scheduler",
                )
            gr.Markdown(
                "**Adapters**: pick up to four, switch them on and set each one's weight. "
                "Sweep varies the first one switched on."
            )
            rows, pickers = [], []
            for index in range(ADAPTER_ROWS):
                with gr.Row(equal_height=True):
                    picker = gr.Dropdown(
                        [], value=None, label=f"Adapter {index + 1}", scale=3, elem_id=f"adapter-{index}"
                    )
                    on = gr.Checkbox(False, label="on", scale=1, min_width=60, elem_id=f"adapter-on-{index}")
                    weight = gr.Slider(
                        -1, 2, 1.0, step=0.05, label="weight", scale=3, elem_id=f"adapter-weight-{index}"
                    )
                picker.change(lambda name: bool(name), picker, on)
                rows += [picker, on, weight]
                pickers.append(picker)
            sweep_weights = gr.Textbox("0, 0.5, 1, 1.5", label="Sweep weights", elem_id="sweep-weights")
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", elem_id="generate")
                compare = gr.Button("Compare", elem_id="compare")
                sweep = gr.Button("Sweep", elem_id="sweep")
        with gr.Column(scale=3):
            gallery = gr.Gallery(
                label="Images (click one to enlarge and download)",
                columns=4,
                height=360,
                object_fit="contain",
                elem_classes=["pixelated"],
                format="png",
                buttons=["download", "fullscreen"],
                elem_id="gallery",
            )
            parameters = gr.Textbox(label="Parameters", lines=8, buttons=["copy"], elem_id="parameters")
            message = gr.Markdown(elem_id="generate-message")

    dice.click(lambda: random.randint(0, MAX_SEED), None, seed)

    def refresh(*current: str | None) -> list:
        names = adapter_names(ctx.outputs)
        return [gr.Dropdown(choices=names, value=value if value in names else None) for value in current]

    tab.select(refresh, pickers, pickers)

    def action(run: Callable[..., Result]) -> Callable:
        """A click handler around one Studio call: form to parameters, errors to the page."""

        def handler(
            base_text,
            prompt_text,
            negative_text,
            seed_value,
            steps_value,
            guidance_value,
            size_text,
            scheduler_name,
            weights_text,
            *row_values,
        ) -> tuple:
            try:
                params = make_params(
                    prompt_text,
                    negative_text,
                    seed_value,
                    steps_value,
                    guidance_value,
                    size_text,
                    scheduler_name,
                )
                result = run(base_text, params, chosen_adapters(row_values), weights_text)
            except USER_ERRORS as error:
                return gr.skip(), gr.skip(), problem(error)
            return result.images, result.parameters, ""

        return handler

    inputs = [base_box, prompt, negative, seed, steps, guidance, size, scheduler, sweep_weights, *rows]
    outputs = [gallery, parameters, message]
    studio = ctx.studio
    generate.click(
        action(lambda base, params, adapters, _: studio.generate(base, params, adapters)), inputs, outputs
    )
    compare.click(
        action(lambda base, params, adapters, _: studio.compare(base, params, adapters)), inputs, outputs
    )
    sweep.click(
        action(
            lambda base, params, adapters, text: studio.sweep(base, params, adapters, parse_weights(text))
        ),
        inputs,
        outputs,
    )
