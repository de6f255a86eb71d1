"""`rwkv-lm`: generate text, chat in the terminal, convert checkpoints.

    rwkv-lm generate --model M.pth --prompt "The Eiffel tower is" --max-tokens 50 --temperature 0
    rwkv-lm chat --model M.pth --system "You are a helpful assistant."
    rwkv-lm convert M.pth M.safetensors        (or back: M.safetensors M.pth; M.gguf; DIR/ an HF folder)
    rwkv-lm serve --model M.pth --port 8000    (an OpenAI-compatible HTTP server)

Bad input ends with one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from .chat import CHAT_DEFAULTS, ChatSession
from .checkpoint import export_gguf, export_hf, export_official, read_model, save, tokenizer_from
from .formats import GGUF_TYPES, OUTPUT_FORMATS, output_format
from .ops.cpu_kernels import LEVELS
from .runtime import WEIGHTS, decode_step, load
from .generate import generate
from .sampling import SamplingParams
from .serve.limits import Limits
from .statefile import load_state

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class UsageError(Exception):
    """Bad command-line input: reported in one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def _add_model_args(p):
    p.add_argument("--model", required=True, help="checkpoint: ours (.safetensors) or an official RWKV-7 .pth")
    p.add_argument("--tokenizer", help="'world', a tokenizer.json, or a .safetensors model whose tokenizer to use "
                                       "(default: the one the checkpoint names)")
    p.add_argument("--dtype", choices=WEIGHTS, default="fp32",
                   help="default fp32; bf16 halves the memory read per token (on a CPU the weights only, "
                        "activations stay fp32 but for each product's input; on a GPU the whole model); int8 (CPU only) halves it again, "
                        "int4 (CPU only, 4 bits and a scale per 64 inputs) again")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda[:N] (default: cuda where a GPU is visible)")
    p.add_argument("--isa", choices=LEVELS, help="on a CPU, the highest instruction-set level of the kernels to use "
                                                  "(default: the best this CPU has, or RWKV_LM_CPU_ISA)")


def _add_sampling_args(p, defaults: SamplingParams):
    p.add_argument("--max-tokens", type=int, default=defaults.max_tokens, help="(default: %(default)s)")
    p.add_argument("--temperature", type=float, default=defaults.temperature, help="0: greedy (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=defaults.top_p, help="(default: %(default)s)")
    p.add_argument("--top-k", type=int, default=defaults.top_k, help="0: no limit (default: %(default)s)")
    p.add_argument("--min-p", type=float, default=defaults.min_p, help="(default: %(default)s)")
    p.add_argument("--presence-penalty", type=float, default=defaults.presence_penalty, help="(default: %(default)s)")
    p.add_argument("--frequency-penalty", type=float, default=defaults.frequency_penalty, help="(default: %(default)s)")
    p.add_argument("--penalty-decay", type=float, default=defaults.penalty_decay,
                   help="repeat counts are multiplied by this after every token (default: %(default)s)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="(default: a random one)")


def _sampling(args) -> SamplingParams:
    """The settings the command line has flags for; the rest (logit_bias, say) keep their defaults."""
    return SamplingParams(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SamplingParams) if hasattr(args, f.name)})


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device; use cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA GPU is visible to torch here; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: there are {torch.cuda.device_count()} GPUs (cuda:0 ...)")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: only cpu and cuda are supported")
    return device


def _model_and_tokenizer(args):
    model = load(args.model, device=_device(args.device), weights=args.dtype, isa=args.isa)
    tokenizer = tokenizer_from(args.tokenizer) if args.tokenizer else model.tokenizer
    if tokenizer is None:
        raise UsageError(f"{args.model} names no tokenizer; pass --tokenizer world, a tokenizer.json, or the "
                         ".safetensors model it was converted from")
    return model, tokenizer


def cmd_generate(args):
    params = _sampling(args)
    if not args.prompt:
        raise UsageError("--prompt is empty; give the text to continue")
    model, tokenizer = _model_and_tokenizer(args)
    state = load_state(args.state, model) if args.state else None
    for piece in generate(model, tokenizer, args.prompt, params, state=state):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_chat(args):
    from rich.console import Console

    params = _sampling(args)
    model, tokenizer = _model_and_tokenizer(args)
    session = ChatSession(model, tokenizer, system=args.system, state=args.state)
    console = Console(highlight=False)
    console.print("[dim]/reset starts over, /save PATH keeps the conversation, /load PATH resumes one, /quit ends[/dim]")
    while True:
        try:
            message = console.input("[bold green]User:[/bold green] ")
        except EOFError:
            break
        command, _, arg = message.strip().partition(" ")
        if command == "/quit":
            break
        if command == "/reset":
            session.reset()
            continue
        if command in ("/save", "/load"):
            if not arg:
                console.print(f"[red]{command} needs a file path[/red]")
            elif command == "/save":
                session.save(arg)
                console.print(f"[dim]saved {session.num_tokens} tokens of conversation to {arg}[/dim]")
            else:
                try:
                    session = ChatSession.load(arg, model, tokenizer)
                except ValueError as e:
                    console.print(f"[red]{e}[/red]")
            continue
        if not message.strip():
            continue
        console.print("[bold blue]Assistant:[/bold blue] ", end="")
        try:
            for piece in session.reply(message, params):
                console.out(piece, end="")
        except KeyboardInterrupt:  # Ctrl-C stops the reply, not the chat
            pass
        state = session.state  # None when Ctrl-C came before the first token was read
        size = f", state {state.nbytes / 2**20:.1f} MiB" if state is not None else ""
        console.print(f"\n[dim]({session.num_tokens} tokens{size})[/dim]")


def cmd_convert(args):
    fmt = output_format(args.output, args.format)
    dst = Path(args.output)
    dtype = DTYPES[args.dtype or ("fp32" if fmt == "hf" else "bf16")]
    model = read_model(args.input, dtype=torch.float32 if fmt == "gguf" else dtype)
    spec = None if model.tokenizer is None else model.tokenizer.spec
    where = None  # where the tokenizer went, for the formats that may leave it behind
    if fmt == "official":
        export_official(model, dst, dtype=dtype)
        if spec == "world":
            where = "the World vocabulary, which an official file gets by itself"
        elif spec is not None:  # the official layout has no place for one
            where = f"not in {dst} (the official format holds none): run it with --tokenizer {args.input}"
        else:
            where = "none (the input carried none)"
    elif fmt == "gguf":
        export_gguf(model, dst, type=args.type)
    elif fmt == "hf":
        export_hf(model, dst, dtype=dtype)
    else:
        save(model, dst, tokenizer=spec)
        where = f"inside {dst}" if spec is not None else "none (the input carried none): run it with --tokenizer"
    print(f"wrote {dst}" + (f"; tokenizer: {where}" if where else ""))


LIMIT_FLAGS = {"max_prompt_tokens": "max_prompt_tokens", "max_tokens": "max_tokens_limit",  # Limits field: flag
               "max_stop_chars": "max_stop_chars", "max_body_bytes": "max_body_mb", "body_timeout_s": "body_timeout",
               "header_timeout_s": "header_timeout", "keep_alive_s": "keep_alive",
               "max_connections": "max_connections", "shutdown_timeout_s": "shutdown_timeout",
               "stall_s": "health_stall"}


def cmd_serve(args):
    try:
        from .serve import listener
        from .serve.server import create_app
    except ImportError as e:
        raise UsageError(f"rwkv-lm serve needs the server packages ({e.name} is missing): pip install 'rwkv-lm[serve]'") from None
    from .serve import Engine

    for name in ("max_batch", "max_queue", "port", "replicas"):
        if getattr(args, name) < (0 if name == "max_queue" else 1):
            raise UsageError(f"--{name.replace('_', '-')} must be {'>= 0' if name == 'max_queue' else '>= 1'}")
    if args.state_cache_mb < 0:
        raise UsageError("--state-cache-mb must be >= 0 (0 turns the cache off)")
    for flag in LIMIT_FLAGS.values():
        if not getattr(args, flag) > 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be > 0")
    values = {field: getattr(args, flag) for field, flag in LIMIT_FLAGS.items()}
    limits = Limits(**{**values, "max_body_bytes": int(args.max_body_mb * 2**20)})
    if (args.replica_cpus is not None and args.replica_cpus <= 0) or (args.replica_gpus or 0) < 0:
        raise UsageError("--replica-cpus must be > 0 and --replica-gpus >= 0")
    if args.replicas > 1:
        return _serve_replicas(args, limits)
    if (args.replica_cpus, args.replica_gpus, args.ray_address) != (None, None, None):
        raise UsageError("--replica-cpus, --replica-gpus and --ray-address go with --replicas 2 or more")
    model, tokenizer = _model_and_tokenizer(args)
    states = {}
    for spec in args.state or ():
        name, sep, path = spec.partition("=")
        if not sep or not name or ":" in name or name in states:
            raise UsageError(f"--state {spec!r}: give NAME=FILE, a new name without ':' for each file")
        states[name] = load_state(path, model)
    engine = Engine(model, tokenizer, max_batch=args.max_batch, max_queue=args.max_queue,
                    cache=int(args.state_cache_mb * 2**20), step=decode_step(model, graphs=args.cuda_graphs))
    app = create_app(engine, model_name=args.model_name or Path(args.model).stem, api_key=args.api_key, limits=limits,
                     allowed_origins=tuple(args.allowed_origins), metrics_public=args.metrics_public,
                     states=states)
    print(f"rwkv-lm: serving {args.model} on http://{args.host}:{args.port}/v1 (batch {args.max_batch}, "
          f"state cache {args.state_cache_mb:g} MB)", file=sys.stderr)
    config = listener.config(app, args.host, args.port, limits, log_level="warning")
    listener.Server(config, engine, limits.shutdown_timeout_s).run()


def _serve_replicas(args, limits: Limits):
    try:
        from .serve.cluster import ClusterOptions, run
    except ImportError as e:
        raise UsageError(f"--replicas needs Ray Serve ({e.name} is missing): pip install 'rwkv-lm[cluster]'") from None
    if not args.ray_address and not Path(args.model).is_file():
        raise UsageError(f"--model {args.model}: no such file")
    options = ClusterOptions(
        model=str(Path(args.model).resolve()), tokenizer=args.tokenizer, dtype=args.dtype, isa=args.isa,
        cuda_graphs=args.cuda_graphs, replicas=args.replicas, replica_cpus=args.replica_cpus or 1,
        replica_gpus=args.replica_gpus or 0, max_batch=args.max_batch, max_queue=args.max_queue,
        state_cache_mb=args.state_cache_mb, limits=dataclasses.asdict(limits), model_name=args.model_name or
        Path(args.model).stem, api_key=args.api_key, allowed_origins=args.allowed_origins,
        metrics_public=args.metrics_public)
    print(f"rwkv-lm: serving {args.model} on http://{args.host}:{args.port}/v1 with {args.replicas} replicas on "
          f"Ray Serve ({args.ray_address or 'a local Ray cluster'})", file=sys.stderr)
    run(options, host=args.host, port=args.port, ray_address=args.ray_address)


STATE_HELP = "a tuned-state file to start from (python -m train export of a model.tune state run; .pth or ours)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rwkv-lm", description="Run RWKV-7 language models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("generate", help="continue a prompt, streaming the text to stdout")
    _add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--state", help=STATE_HELP)
    _add_sampling_args(p, SamplingParams())
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("chat", help="chat in the terminal (User:/Assistant: template)")
    _add_model_args(p)
    p.add_argument("--system", help="system prompt")
    p.add_argument("--state", help=STATE_HELP)
    _add_sampling_args(p, CHAT_DEFAULTS)
    p.set_defaults(run=cmd_chat)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (completions, chat completions, streaming)")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 to serve a network")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/ requests")
    p.add_argument("--max-batch", type=int, default=32, help="requests decoded together (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests that may wait for a row; past that the server answers 503 (default: %(default)s)")
    p.add_argument("--state-cache-mb", type=float, default=512,
                   help="RAM for cached prefix states, so repeated prompt beginnings are read once (default: %(default)s)")
    p.add_argument("--model-name", help="the model id clients see (default: the checkpoint's file name)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="on a GPU, replay decode steps as CUDA graphs of the fused step (default: RWKV_LM_CUDA_GRAPHS=1; "
                        "never run on a GPU yet)")
    p.add_argument("--allowed-origins", action="append", default=[], metavar="ORIGIN",
                   help="a browser origin allowed to call the API (CORS; repeatable; '*' for any; default: none)")
    p.add_argument("--metrics-public", action="store_true",
                   help="serve /metrics without the API key (/health never needs it)")
    limits = Limits()
    p.add_argument("--max-prompt-tokens", type=int, default=limits.max_prompt_tokens,
                   help="longer prompts get 413 (default: %(default)s)")
    p.add_argument("--max-tokens-limit", type=int, default=limits.max_tokens,
                   help="a request's max_tokens may be at most this, else 400 (default: %(default)s)")
    p.add_argument("--max-stop-chars", type=int, default=limits.max_stop_chars,
                   help="a stop string may have at most this many characters, else 400 (default: %(default)s)")
    p.add_argument("--max-body-mb", type=float, default=limits.max_body_bytes / 2**20,
                   help="larger request bodies get 413 before they are read (default: %(default)g)")
    p.add_argument("--body-timeout", type=float, default=limits.body_timeout_s,
                   help="seconds for a request body to arrive, else 408 (default: %(default)g)")
    p.add_argument("--header-timeout", type=float, default=limits.header_timeout_s,
                   help="seconds for a request's head to arrive, else the connection is closed (default: %(default)g)")
    p.add_argument("--keep-alive", type=float, default=limits.keep_alive_s,
                   help="seconds an idle keep-alive connection is kept (default: %(default)g)")
    p.add_argument("--max-connections", type=int, default=limits.max_connections,
                   help="open connections beyond this get 503 (default: %(default)s)")
    p.add_argument("--shutdown-timeout", type=float, default=limits.shutdown_timeout_s,
                   help="seconds requests run on after SIGTERM/SIGINT before they are ended with finish_reason "
                        "'abort'; a second signal exits at once (default: %(default)g)")
    p.add_argument("--health-stall", type=float, default=limits.stall_s,
                   help="/health answers 503 once one engine iteration has run this many seconds (default: %(default)g)")
    p.add_argument("--replicas", type=int, default=1,
                   help="engines behind the endpoint; 2 or more run on Ray Serve (pip install 'rwkv-lm[cluster]'), "
                        "each conversation kept on one replica (default: %(default)s)")
    p.add_argument("--replica-cpus", type=float, help="CPUs (and torch threads) per replica (default: 1)")
    p.add_argument("--replica-gpus", type=float, help="GPUs per replica (default: 0); replicas with GPUs run on cuda, the others on cpu")
    p.add_argument("--ray-address", help="an existing Ray cluster (e.g. ray://head:10001 or auto); default: a local one")
    p.add_argument("--state", action="append", metavar="NAME=FILE",
                   help="a tuned state clients may start from, as model 'MODEL_NAME:NAME' (repeatable; " + STATE_HELP + ")")
    p.set_defaults(run=cmd_serve)

    p = sub.add_parser("convert", help="convert between our .safetensors, official .pth, GGUF and Hugging Face folders")
    p.add_argument("input", help="any model file, a Hugging Face folder, or hf:OWNER/REPO/FILE")
    p.add_argument("output", help="*.safetensors: ours; *.pth: the official layout; *.gguf: llama.cpp; DIR/: an fla-hub "
                                  "Hugging Face folder")
    p.add_argument("--format", choices=OUTPUT_FORMATS, help="the output format, when the name does not say it")
    p.add_argument("--dtype", choices=sorted(DTYPES),
                   help="stored dtype of ours, .pth and HF folders (default bf16, as official files; HF folders fp32)")
    p.add_argument("--type", choices=GGUF_TYPES, default="f16",
                   help="GGUF: the type of the big matrices (default %(default)s; vectors and norms stay f32)")
    p.set_defaults(run=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.run(args)
    except (UsageError, ValueError) as e:  # CheckpointError is a ValueError
        print("rwkv-lm: error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
