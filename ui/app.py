"""The sdlora web app: Train, Runs, Generate and Adapters tabs over the sdlora library.

The page only lays out controls and passes their values on; training, models, files, presets and the
adapter library are the library's. Run it with ``python -m ui``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import anyio
import gradio as gr
from starlette.middleware import Middleware

from sdlora.access import Credentials, HostPolicy, LoginThrottle, exposure_warning
from sdlora.data.uploads import EMPTY_FOLDER, RELATIVE_SEP, UploadLedger, clean_upload_cache, clean_uploads
from sdlora.demo import DEMO_KEYWORD, DEMO_MODEL_DIR, base_spec, demo_model_available, is_demo
from sdlora.generate.studio import Studio
from sdlora.jobs import JobQueue
from sdlora.outputs import Outputs
from ui.adapters_tab import build_adapters_tab
from ui.common import USER_ERRORS, AppContext, problem
from ui.generate_tab import build_generate_tab
from ui.guard import ServerGuard
from ui.images_tab import GENERATE_TAB, build_history_tab, build_png_info_tab
from ui.runs_tab import build_runs_tab
from ui.train_tab import build_train_tab

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
MAX_UPLOAD = "200mb"  # per file; uploads land only under outputs/uploads
# Gradio's cache of uploads: checked hourly, files older than a day removed (and all of them at shutdown).
CACHE_CLEANING = (3600, 86_400)
# Demo images are 32 px: scaled up smoothly they are a blur, so show their pixels.
CSS = """
.pixelated img { image-rendering: pixelated; }
#library-sample img, #png-drop img { width: 100%; height: 100%; object-fit: contain; }
.sdlora-gallery .grid-wrap { max-height: none; overflow: visible; }
.sdlora-settings textarea { font-family: monospace; }
.sdlora-progress { display: flex; gap: 1em; align-items: center; }
.sdlora-progress progress { flex: 1; height: 1.2em; }
"""


# Browsers send a picked folder's files under their bare names, so sub-folders (kohya's `N_words`) and
# same-named files in different sub-folders would be lost: rename each file to its path inside the folder
# (parts joined by RELATIVE_SEP) before Gradio uploads it, and send a marker for a folder with no files.
# A dropped folder reaches Gradio as one unreadable entry (the upload fails with "Failed to fetch"), so
# a drop that holds folders is walked here and handed to the input as if its files had been picked.
HEAD = f"""<script>
const sdloraName = (path) => path.split("/").join("{RELATIVE_SEP}");
const sdloraFiles = (files) => {{
  const transfer = new DataTransfer();
  if (!files.length) transfer.items.add(new File([], "{EMPTY_FOLDER}"));
  for (const [file, path] of files) {{
    transfer.items.add(new File([file], sdloraName(path), {{ type: file.type, lastModified: file.lastModified }}));
  }}
  return transfer.files;
}};
document.addEventListener("change", (event) => {{
  const input = event.target;
  if (!(input instanceof HTMLInputElement) || input.type !== "file" || !input.webkitdirectory) return;
  if (input.dataset.sdloraDropped) {{  // the drop below has named the files already
    delete input.dataset.sdloraDropped;
    return;
  }}
  const picked = Array.from(input.files || [], (file) => [file, file.webkitRelativePath || file.name]);
  input.files = sdloraFiles(picked);
}}, true);
async function sdloraWalk(entry, found) {{
  if (entry.isFile) {{
    found.push([await new Promise((done, fail) => entry.file(done, fail)), entry.fullPath.replace(/^\\//, "")]);
    return;
  }}
  const reader = entry.createReader();
  for (let batch; (batch = await new Promise((done, fail) => reader.readEntries(done, fail))).length; ) {{
    for (const child of batch) await sdloraWalk(child, found);
  }}
}}
document.addEventListener("drop", async (event) => {{
  const zone = event.target instanceof Element ? event.target.closest(".block") : null;
  const input = zone && zone.querySelector("input[type=file]");
  const entries = Array.from(event.dataTransfer?.items || [], (item) => item.webkitGetAsEntry?.());
  if (!input || !input.webkitdirectory || !entries.some((entry) => entry?.isDirectory)) return;
  event.preventDefault();
  event.stopPropagation();
  zone.querySelector("button")?.dispatchEvent(new DragEvent("drop", {{ bubbles: true, cancelable: true }}));
  const found = [];
  for (const entry of entries) if (entry) await sdloraWalk(entry, found);
  input.files = sdloraFiles(found);
  input.dataset.sdloraDropped = "1";
  input.dispatchEvent(new Event("change", {{ bubbles: true }}));
}}, true);
// AUTOMATIC1111's habit: Ctrl+Enter (Cmd+Enter on a Mac) in a prompt box generates.
document.addEventListener("keydown", (event) => {{
  if (event.key !== "Enter" || !(event.ctrlKey || event.metaKey)) return;
  if (!event.target.closest?.("#gen-prompt, #gen-negative")) return;
  event.preventDefault();
  document.querySelector("#generate")?.click();
}}, true);
</script>"""


def build_app(
    outputs_dir: str | Path = "outputs",
    base: str | None = None,
    queue: JobQueue | None = None,
    uploads: UploadLedger | None = None,
) -> gr.Blocks:
    """The app's page; `base` is the base model the page starts with (None: the bundled demo model),
    `queue` the training queue (a new one by default; pass one to share it with other code) and `uploads`
    the record of what each client uploaded (which the server's guard keeps)."""
    outputs = Outputs(Path(outputs_dir))
    ctx = AppContext(outputs, queue or JobQueue(), Studio(outputs), uploads or UploadLedger())
    with gr.Blocks(title="sdlora", analytics_enabled=False, delete_cache=CACHE_CLEANING) as app:
        gr.Markdown("# sdlora: train and use Stable Diffusion LoRA adapters")
        with gr.Row(equal_height=True):
            base_box = gr.Textbox(
                base or DEMO_KEYWORD,
                label="Base model",
                scale=5,
                elem_id="base-model",
                info="A hub id, a local diffusers folder or a single .safetensors checkpoint; "
                "'demo' (or empty) for the bundled demo model.",
            )
            load = gr.Button("Load", scale=1, elem_id="load-base")
        notice = gr.Markdown(base_notice(base), elem_id="base-notice")
        with gr.Tabs() as tabs:
            with gr.Tab("Train", id="train"):
                build_train_tab(app, ctx, base_box, base)
            with gr.Tab("Runs", id="runs") as runs_tab:
                build_runs_tab(ctx, runs_tab)
            with gr.Tab("Generate", id=GENERATE_TAB) as generate_tab:
                form = build_generate_tab(ctx, base_box, load, generate_tab)
            with gr.Tab("PNG info", id="png-info"):
                build_png_info_tab(ctx, form, tabs)
            with gr.Tab("History", id="history") as history_tab:
                build_history_tab(ctx, form, history_tab, tabs)
            with gr.Tab("Adapters", id="adapters") as adapters_tab:
                build_adapters_tab(ctx, adapters_tab)

        def left(request: gr.Request) -> None:
            """A page that went away (closed, reloaded, lost) stops its generation between two steps."""
            ctx.studio.stop(request.session_hash)

        app.unload(left)

        def loaded(text: str) -> str:
            try:
                name = ctx.studio.load(text)
            except USER_ERRORS as error:
                return f"{base_notice(text)}\n\n{problem(error)}"
            return f"{base_notice(text)}\n\nLoaded `{name}`."

        base_box.submit(loaded, base_box, notice)
        load.click(loaded, base_box, notice)
        base_box.change(base_notice, base_box, notice, show_progress="hidden")
    return app


def base_notice(text: str | None) -> str:
    """The page's plain statement of which base model is in use, and how to use a real one."""
    how = (
        "To use a real model, enter a Hugging Face hub id (e.g. `stable-diffusion-v1-5/stable-diffusion-v1-5`), "
        "a local diffusers folder or a single `.safetensors` checkpoint above and press **Load**."
    )
    if not is_demo(text):
        return f"Base model: `{base_spec(text)}`. Leave the field empty (or type `demo`) for the bundled demo model."
    if not demo_model_available():
        return (
            f"**The bundled demo model is missing** from `{DEMO_MODEL_DIR}`: build it with "
            f"`sdlora demo-model build`. {how}"
        )
    return (
        "**Using the bundled demo model**: a tiny model that only draws simple coloured shapes at 32×32 px, "
        f"so training and generating run in seconds on a CPU. {how}"
    )


def launch(
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    listen: bool = False,
    auth: tuple[str, str] | Credentials | None = None,
    outputs_dir: str | Path = "outputs",
    base: str | None = None,
    *,
    queue: JobQueue | None = None,
    block: bool = True,
    allowed_hosts: Sequence[str] = (),
) -> gr.Blocks:
    """Serve the app on `host:port` (all interfaces with `listen`); `block=False` returns at once with the
    server running in a background thread (tests use this).

    Only Host names the server was started for are answered (loopback names, `allowed_hosts`), and a
    non-loopback address without `auth` is served with a warning on stderr."""
    server_name = "0.0.0.0" if listen else host
    warning = exposure_warning(server_name, auth is not None)
    if warning:
        print(warning, file=sys.stderr)
    outputs = Path(outputs_dir).resolve()
    outputs.mkdir(parents=True, exist_ok=True)
    queue = queue or JobQueue()
    clean_uploads(Outputs(outputs), in_use=[job.config.data_dir for job in queue.jobs() if not job.finished])
    clean_upload_cache(Outputs(outputs), min_age_s=CACHE_CLEANING[1])
    ledger = UploadLedger()
    guard = Middleware(
        ServerGuard,
        policy=HostPolicy(server_name, tuple(allowed_hosts)),
        throttle=LoginThrottle(),
        ledger=ledger,
    )
    app = build_app(outputs, base, queue, ledger)
    app.queue(default_concurrency_limit=1)
    app.launch(
        server_name=server_name,
        server_port=port,
        auth=_login_check(auth),
        allowed_paths=[str(outputs)],
        prevent_thread_lock=not block,
        show_error=True,
        ssr_mode=False,
        css=CSS,
        head=HEAD,
        quiet=not block,
        max_file_size=MAX_UPLOAD,
        app_kwargs={"middleware": [guard]},
        num_workers=0,  # static-file workers would serve on other ports, outside the guard
    )
    return app


def _login_check(auth: tuple[str, str] | Credentials | None):
    """Gradio's auth callable: the check runs in a worker thread, as PBKDF2 takes a noticeable moment."""
    if auth is None:
        return None
    credentials = auth if isinstance(auth, Credentials) else Credentials({auth[0]: auth[1]})

    async def check(user: str, password: str) -> bool:
        return await anyio.to_thread.run_sync(credentials.verify, user, password)

    return check
