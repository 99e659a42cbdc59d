"""The Generate tab: a prompt, stacked adapters with weights, Generate / Stop / Compare / Sweep, X/Y plots."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import gradio as gr

from sdlora.adapters.library import adapter_names
from sdlora.config import (
    MAX_IMAGES,
    ConfigError,
    GenerateConfig,
    option_choices,
    option_default,
    option_help,
    parse_weights,
)
from sdlora.generate.grids import parse_axis
from sdlora.generate.studio import Recalled, Result, make_params
from ui.common import USER_ERRORS, AppContext, problem

ADAPTER_ROWS = 4
MAX_WEIGHT = 4  # the Generator's documented range: -4..4
LIBRARY_POLL_SECONDS = 2  # how soon a trained, imported, renamed or deleted adapter shows in the menus
# X/Y plot axes as the page offers them; "Adapter N" is the adapter picked in row N.
NO_AXIS = "none"
CROSSFADE = "Cross-fade 1 → 2"
AXES = [
    *(f"Adapter {index + 1} weight" for index in range(ADAPTER_ROWS)),
    "Seed",
    "Steps",
    "Guidance",
    CROSSFADE,
]
CROSSFADE_POINTS = "0, 0.25, 0.5, 0.75, 1"
CHECKPOINTS = "Checkpoints of "  # + a run folder's name: one column (or row) per checkpoint, by step


def chosen_adapters(rows: Sequence) -> list[tuple[str, float]]:
    """(name, weight) of each adapter row that is switched on and has an adapter picked.

    `rows` is the page's flat list of row values: name, on, weight for each row in turn."""
    triples = [rows[index : index + 3] for index in range(0, len(rows), 3)]
    return [(name, float(weight)) for name, on, weight in triples if on and name]


def gallery_columns(count: int) -> int:
    """A near-square grid, so that every image of a click (1 to 16) is whole and visible at once."""
    return max(1, math.ceil(math.sqrt(count)))


def axis_kind(choice: str, pickers: Sequence[str | None]) -> str:
    """The library's axis kind for an axis menu's choice, adapters named by what their rows picked."""

    def picked(index: int) -> str:
        if not pickers[index]:
            raise ConfigError(f"The X/Y axis '{choice}' needs an adapter picked in row {index + 1}.")
        return pickers[index]

    if choice == CROSSFADE:
        return f"crossfade:{picked(0)}:{picked(1)}"
    if choice.startswith(CHECKPOINTS):
        return f"checkpoint:{choice.removeprefix(CHECKPOINTS)}"
    if choice.startswith("Adapter "):
        return f"weight:{picked(int(choice.split()[1]) - 1)}"
    return choice.lower()


@dataclass
class GenerateForm:
    """The controls other tabs fill (PNG info and history send settings here) or refresh (adapter menus)."""

    prompt: gr.Textbox
    negative: gr.Textbox
    seed: gr.Number
    steps: gr.Slider
    guidance: gr.Slider
    size: gr.Dropdown
    scheduler: gr.Dropdown
    pickers: list[gr.Dropdown]
    ons: list[gr.Checkbox]
    weights: list[gr.Slider]
    message: gr.Markdown

    @property
    def fields(self) -> list[gr.components.Component]:
        """The controls `filled` sets, in its order."""
        rows = [c for row in zip(self.pickers, self.ons, self.weights, strict=True) for c in row]
        return [
            self.prompt,
            self.negative,
            self.seed,
            self.steps,
            self.guidance,
            self.size,
            self.scheduler,
            *rows,
            self.message,
        ]


def filled(recalled: Recalled, library: Sequence[str]) -> list:
    """Updates for `GenerateForm.fields` from a PNG's settings; adapters not in the library are named."""
    kept = [(name, weight) for name, weight in recalled.adapters if name in library][:ADAPTER_ROWS]
    missing = [name for name, _ in recalled.adapters if name not in library]
    rows = []
    for index in range(ADAPTER_ROWS):
        name, weight = kept[index] if index < len(kept) else (None, None)
        rows += [
            gr.Dropdown(choices=list(library), value=name),
            name is not None,
            gr.skip() if weight is None else max(-MAX_WEIGHT, min(MAX_WEIGHT, weight)),
        ]
    note = f"Not in the adapter library, so left out: {', '.join(missing)}." if missing else ""

    def kept_or_skip(value):
        return gr.skip() if value is None else value

    return [
        recalled.prompt,
        recalled.negative,
        kept_or_skip(recalled.seed),
        kept_or_skip(recalled.steps),
        kept_or_skip(recalled.guidance),
        kept_or_skip(recalled.size),
        kept_or_skip(recalled.scheduler),
        *rows,
        f"Settings sent from the image. {note}".strip(),
    ]


def build_generate_tab(ctx: AppContext, base_box: gr.Textbox, load: gr.Button, tab: gr.Tab) -> GenerateForm:
    """Lay out the tab inside the current Blocks; the adapter menus follow the library, the Size menu the
    base (`load` loads another). Returns the controls other tabs fill."""
    with gr.Row(equal_height=False):
        with gr.Column(scale=2):
            prompt = gr.Textbox(
                label="Prompt (Ctrl+Enter generates)",
                lines=2,
                info=option_help(GenerateConfig, "prompt") + " <lora:NAME:WEIGHT> adds an adapter.",
                elem_id="gen-prompt",
            )
            negative = gr.Textbox(
                label="Negative prompt",
                info=option_help(GenerateConfig, "negative_prompt"),
                elem_id="gen-negative",
            )
            with gr.Row():
                seed = gr.Number(
                    option_default(GenerateConfig, "seed"),
                    label="Seed (-1: random)",
                    precision=0,
                    minimum=-1,
                    scale=3,
                    elem_id="gen-seed",
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
                    elem_id="gen-guidance",
                )
                size = gr.Dropdown(
                    [],
                    value=None,
                    allow_custom_value=True,
                    label="Size (WxH)",
                    info="The base model's own size first; or type e.g. 640x512.",
                    elem_id="gen-size",
                )
                scheduler = gr.Dropdown(
                    option_choices(GenerateConfig, "scheduler"),
                    value=option_default(GenerateConfig, "scheduler"),
                    label="Scheduler",
                    elem_id="gen-scheduler",
                )
            gr.Markdown(
                "**Adapters**: pick up to four, switch them on and set each one's weight "
                f"(-{MAX_WEIGHT} to {MAX_WEIGHT}). Sweep varies the first one switched on."
            )
            pickers, ons, weights = [], [], []
            for index in range(ADAPTER_ROWS):
                with gr.Row(equal_height=True):
                    picker = gr.Dropdown(
                        [], value=None, label=f"Adapter {index + 1}", scale=3, elem_id=f"adapter-{index}"
                    )
                    on = gr.Checkbox(False, label="on", scale=1, min_width=60, elem_id=f"adapter-on-{index}")
                    weight = gr.Slider(
                        -MAX_WEIGHT,
                        MAX_WEIGHT,
                        1.0,
                        step=0.05,
                        label="weight",
                        scale=3,
                        elem_id=f"adapter-weight-{index}",
                    )
                # Picking an adapter switches its row on in the page itself: a server round trip could
                # lose the race with a click on Generate or Sweep right after the pick.
                picker.input(None, picker, on, js="(name) => Boolean(name)")
                pickers.append(picker)
                ons.append(on)
                weights.append(weight)
            live = gr.Checkbox(
                False,
                label="Live: re-render one image whenever a weight moves",
                elem_id="live",
            )
            sweep_weights = gr.Textbox("0, 0.5, 1, 1.5", label="Sweep weights", elem_id="sweep-weights")
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", elem_id="generate")
                stop = gr.Button("Stop", variant="stop", elem_id="stop")
                compare = gr.Button("Compare", elem_id="compare")
                sweep = gr.Button("Sweep", elem_id="sweep")
            with gr.Accordion("X/Y plot", open=False, elem_id="xy") as xy:
                gr.Markdown(
                    "One image per (X, Y) pair, one seed, at most 16 images; the grid is saved as one "
                    "PNG with every image's parameters. *Adapter N* is the adapter picked in row N; "
                    "*Checkpoints of RUN* puts each checkpoint of a run (by step) at weight 1."
                )
                with gr.Row():
                    x_kind = gr.Dropdown(AXES, value="Adapter 1 weight", label="X axis", elem_id="x-kind")
                    x_values = gr.Textbox("0, 0.5, 1", label="X values", elem_id="x-values")
                with gr.Row():
                    y_kind = gr.Dropdown([NO_AXIS, *AXES], value=NO_AXIS, label="Y axis", elem_id="y-kind")
                    y_values = gr.Textbox("", label="Y values", elem_id="y-values")
                with gr.Row():
                    crossfade = gr.Button("Cross-fade preset (adapter 1 → 2)", elem_id="crossfade")
                    plot = gr.Button("Make X/Y plot", variant="primary", elem_id="plot")
        with gr.Column(scale=3):
            gallery = gr.Gallery(
                label="Images (click one to enlarge and download)",
                columns=1,
                height="auto",
                object_fit="contain",
                elem_classes=["pixelated", "sdlora-gallery"],
                format="png",
                buttons=["download", "fullscreen"],
                elem_id="gallery",
            )
            parameters = gr.Textbox(label="Parameters", lines=8, buttons=["copy"], elem_id="parameters")
            message = gr.Markdown(elem_id="generate-message")
    form = GenerateForm(
        prompt, negative, seed, steps, guidance, size, scheduler, pickers, ons, weights, message
    )

    dice.click(lambda: -1, None, seed)

    def menus(*current: str | None) -> list:
        """New choices for the adapter menus. A menu's value is cleared only when its adapter is gone: the
        values read here may be older than a pick the user made meanwhile, which must stay."""
        names = adapter_names(ctx.outputs)
        return [names] + [
            gr.Dropdown(choices=names, value=None) if v and v not in names else gr.Dropdown(choices=names)
            for v in current
        ]

    def axes() -> tuple:
        runs = [f"{CHECKPOINTS}{run}" for run in ctx.studio.checkpoint_runs()]
        return gr.Dropdown(choices=AXES + runs), gr.Dropdown(choices=[NO_AXIS, *AXES, *runs])

    def axis_chosen(choice: str, values: str) -> str:
        """A checkpoint axis starts with every checkpoint of its run (at most 16)."""
        if not (choice or "").startswith(CHECKPOINTS):
            return gr.skip()
        steps = ctx.studio.checkpoint_runs().get(choice.removeprefix(CHECKPOINTS), [])
        return ", ".join(map(str, steps[-MAX_IMAGES:]))

    def sizes(base_text: str, current: str | None) -> gr.Dropdown:
        try:
            choices = ctx.studio.sizes(base_text)
        except USER_ERRORS:
            return gr.skip()  # the base's own message is shown by the Load button
        return gr.Dropdown(choices=choices, value=current if current in choices else choices[0])

    library = gr.State([])
    tab.select(menus, pickers, [library, *pickers]).then(sizes, [base_box, size], size)
    gr.on([tab.select, xy.expand], axes, None, [x_kind, y_kind])
    x_kind.input(axis_chosen, [x_kind, x_values], x_values)
    y_kind.input(axis_chosen, [y_kind, y_values], y_values)
    gr.on([load.click, base_box.submit], sizes, [base_box, size], size)

    def library_changed(known: list[str], *current: str | None) -> list:
        if adapter_names(ctx.outputs) == known:
            return [gr.skip()] * (1 + len(current))
        return menus(*current)

    gr.Timer(LIBRARY_POLL_SECONDS).tick(
        library_changed, [library, *pickers], [library, *pickers], show_progress="hidden"
    )

    rows = [c for row in zip(pickers, ons, weights, strict=True) for c in row]
    inputs = {base_box, prompt, negative, seed, steps, guidance, size, scheduler, sweep_weights, *rows}
    inputs |= {x_kind, x_values, y_kind, y_values}
    outputs = [gallery, parameters, message]

    def action(run: Callable[..., Result]) -> Callable:
        """A click handler around one Studio call: form to parameters, errors to the page, the caller's
        session as the owner a Stop button (or the page going away) stops."""

        def handler(values: dict, request: gr.Request, progress=gr.Progress()) -> tuple:  # noqa: B008
            try:
                params = make_params(
                    values[prompt],
                    values[negative],
                    values[seed],
                    values[steps],
                    values[guidance],
                    values[size],
                    values[scheduler],
                )
                chosen = chosen_adapters([values[c] for c in rows])
                result = run(values, params, chosen, request.session_hash, progress)
            except USER_ERRORS as error:
                return gr.skip(), gr.skip(), problem(error)
            columns = gallery_columns(len(result.images))
            return gr.Gallery(value=result.images, columns=columns), result.parameters, ""

        return handler

    studio = ctx.studio

    def one(values, params, chosen, owner, _):
        return studio.generate(values[base_box], params, chosen, owner)

    def compared(values, params, chosen, owner, _):
        return studio.compare(values[base_box], params, chosen, owner)

    def swept(values, params, chosen, owner, _):
        return studio.sweep(values[base_box], params, chosen, parse_weights(values[sweep_weights]), owner)

    def plotted(values, params, chosen, owner, progress):
        picked = [values[picker] for picker in pickers]
        x = parse_axis(axis_kind(values[x_kind], picked), values[x_values])
        y = None
        if values[y_kind] != NO_AXIS:
            y = parse_axis(axis_kind(values[y_kind], picked), values[y_values])
        return studio.xy(
            values[base_box],
            params,
            chosen,
            x,
            y,
            owner,
            on_image=lambda done, total: progress((done, total), desc="X/Y plot", unit="images"),
        )

    # One queue for every generating event: a click waits its turn (the page shows its place) rather
    # than holding a thread while another page's images are made.
    queued = {"concurrency_limit": 1, "concurrency_id": "generate"}
    generate.click(action(one), inputs, outputs, **queued, api_name="generate")
    compare.click(action(compared), inputs, outputs, **queued, api_name="compare")
    sweep.click(action(swept), inputs, outputs, **queued, api_name="sweep")
    plot.click(action(plotted), inputs, outputs, **queued, api_name="xy_plot")
    live_render = action(one)

    def moved(values: dict, request: gr.Request) -> tuple:
        if not values[live]:
            return gr.skip(), gr.skip(), gr.skip()
        return live_render(values, request)

    gr.on(
        [*(w.change for w in weights), *(o.input for o in ons)],
        moved,
        inputs | {live},
        outputs,
        trigger_mode="always_last",
        show_progress="hidden",
        **queued,
    )

    def stopped(request: gr.Request) -> str:
        if ctx.studio.stop(request.session_hash):
            return "Stopping after the current step…"
        return "Nothing of yours is being generated."

    stop.click(stopped, None, message)
    crossfade.click(
        lambda: (CROSSFADE, CROSSFADE_POINTS, NO_AXIS, ""), None, [x_kind, x_values, y_kind, y_values]
    )
    return form
