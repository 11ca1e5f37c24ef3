"""`flextron generate`: text from one sub-network of a saved elastic model, with a KV cache.

    flextron generate DIR --budget params=0.6 --prompt "The capital of France" --max-new-tokens 32
    flextron generate DIR --fraction 0.5 --prompt "..." --temperature 0.8 --top-p 0.9 --seed 1
    flextron generate DIR --widths sel.json --prompt "..." --runtime onnxruntime
    flextron generate HF_DIR --prompt "..."          # a folder of `flextron export --format hf`
    flextron generate DIR --routers ROUTER_RUN --budget latency=0.6 --prompt "..."

The sub-network is built as the source Hugging Face class at its (per-layer) widths
(export/sliced.py), so its key/value cache holds the heads each layer keeps. With
`--runtime onnxruntime` it is first exported as an ONNX decoder with past keys and values
(export/decoder_onnx.py, checked against PyTorch) to a temporary file. With `--routers`,
static routers choose the widths for `--budget`; dynamic routers instead choose every
token's widths as it is generated (routed execution; with a key/value cache for
Llama-style families, GPT-2 and GPT-NeoX, export/routed_hf.py, otherwise each step runs the whole sequence in
the elastic graph; with `--runtime onnxruntime`, an ONNX decoder with the routers inside,
export/routed_onnx.py), and the mean cost per new token is printed.
The prompt is tokenized with the tokenizer saved in DIR, the one named by `--tokenizer`,
or the bundled SmolLM2 tokenizer when the vocabulary sizes agree; `--prompt-ids "1 2 3"`
skips tokenizing.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

_BUNDLED = "smollm2-135m"


def add_parser(sub) -> None:
    """Register ``flextron generate`` on the top-level subparsers ``sub``."""
    p = sub.add_parser("generate", help="generate text with one sub-network and a KV cache",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("elastic", help="a folder saved by `flextron convert` / `train-elastic`, "
                                   "or one written by `flextron export --format hf`")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--fraction", type=float, help="every op at this width fraction")
    which.add_argument("--widths", help="a JSON file {op name: width}, or what "
                                        "`flextron select --json` wrote")
    which.add_argument("--budget", help="params=0.6, memory=300MB, latency=0.6 (with --lut): "
                                        "the largest uniform widths within it, or the "
                                        "routers' budget with --routers")
    p.add_argument("--lut", default=None, help="latency table, for latency budgets")
    p.add_argument("--routers", default=None,
                   help="a `flextron train-routers` run (or its final/) for DIR's model: "
                        "static routers choose the widths for --budget once; dynamic or "
                        "capacity ones choose every token's widths (routed execution)")
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt", help="the text to continue")
    text.add_argument("--prompt-ids", help="the prompt as token ids: \"1 2 3\"")
    p.add_argument("--max-new-tokens", type=int, default=32)
    how = p.add_mutually_exclusive_group()
    how.add_argument("--greedy", action="store_true", help="the most likely token (default)")
    how.add_argument("--temperature", type=float, default=None,
                     help="sample at this temperature (default 1.0 when --top-p is given)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: keep the "
                                                              "most likely tokens up to this mass")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling")
    p.add_argument("--runtime", choices=["torch", "onnxruntime"], default="torch")
    p.add_argument("--tokenizer", default=None, help="bundled model whose tokenizer to use "
                                                     f"(default: DIR's own, else {_BUNDLED})")
    p.set_defaults(func=generate_command)


def generate_command(args: argparse.Namespace) -> int:
    import torch

    from ..errors import CheckpointError, InputError
    from .generate import OrtDecoder, Sampling, TorchDecoder, generate

    folder = Path(args.elastic)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder; pass one saved by `flextron "
                              "convert` / `flextron train-elastic`, or by `flextron export "
                              "--format hf`")
    if args.greedy and args.top_p is not None:
        raise InputError("--top-p samples; it cannot go with --greedy")
    sampled = args.temperature is not None or args.top_p is not None
    sampling = Sampling(greedy=not sampled, temperature=args.temperature or 1.0,
                        top_p=1.0 if args.top_p is None else args.top_p, seed=args.seed)
    if not isinstance(args.max_new_tokens, int) or args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    given = _prompt_ids(args.prompt_ids)  # cheap checks before the model is built
    routed = None
    if args.routers:
        em, chosen = _with_routers(folder, args)
        if isinstance(chosen, dict):  # static routers: their widths for the budget
            from .commands import _describe
            from .sliced import sliced_hf

            print(f"widths: {_describe(em, chosen)} (static routers)")
            model = sliced_hf(em, chosen)
        else:
            model, routed = em, chosen
    else:
        model = _model(folder, args)
    vocab = _vocab(model)
    tokenizer = None if given is not None else _tokenizer(folder, vocab, args)
    ids = _prompt(given if given is not None else tokenizer(args.prompt)["input_ids"], vocab)
    if routed and args.runtime == "torch":
        decoder = routed
    elif routed:
        from .generate import OrtRoutedDecoder
        from .routed_onnx import to_routed_onnx

        _keep, path = _exported(  # the folder lives until generation ends
            lambda out: to_routed_onnx(em, out), "the routed ONNX decoder (routers inside)")
        decoder = OrtRoutedDecoder(path, routed.table, routed.budget,
                                   threads=torch.get_num_threads())
    elif args.runtime == "torch":
        decoder = TorchDecoder(model)
    else:
        from .decoder_onnx import to_onnx_decoder

        _keep, path = _exported(  # the folder lives until generation ends
            lambda out: to_onnx_decoder(model, out), "the ONNX decoder")
        decoder = OrtDecoder(path, threads=torch.get_num_threads())
    eos = getattr(tokenizer, "eos_token_id", None)
    out = generate(decoder, ids, args.max_new_tokens, sampling, eos=eos)
    new = show(out, ids, tokenizer, args.runtime)
    if routed:
        spent = decoder.costs[:len(new)]
        print(f"dynamic routers at budget {routed.budget:.4g}: the new tokens cost "
              f"{sum(spent) / len(spent):.3f} of the full model's {routed.table.metric} on "
              f"average ({min(spent):.3f} to {max(spent):.3f})")
        if decoder is not routed:
            print("routers inside the ONNX graph; key/value cache with every head's keys and "
                  "values; the prompt fed one token at a time")
        elif routed.cached is None:
            print(f"no key/value cache: every step ran the whole sequence ({routed.why})")
        else:
            print("key/value cache with every head's keys and values; each token's queries, "
                  "MLP and output projection at its own widths")
    return 0


def _exported(export, what: str):
    """(the temporary folder, which must outlive generation, and the file `export(path)`
    wrote in it), with the time it took printed."""
    tmp = tempfile.TemporaryDirectory(prefix="flextron-decoder-")
    t0 = time.perf_counter()
    path = export(Path(tmp.name) / "decoder.onnx")
    print(f"exported {what} in {time.perf_counter() - t0:.1f} s (checked against PyTorch)")
    return tmp, path


def show(out, ids, tokenizer, runtime: str) -> list[int]:
    """Print generated text (token ids without a tokenizer) and its speed; returns the new
    token ids of the first row."""
    new = out.tokens[0].tolist()
    if tokenizer is not None:
        print(tokenizer.decode(ids[0].tolist() + new, skip_special_tokens=True))
    else:
        print("tokens:", " ".join(map(str, new)))
    print(f"{len(new)} new tokens in {out.prefill_s + out.decode_s:.2f} s "
          f"({out.tokens_per_s:.1f} tokens/s, {runtime}; prompt of {ids.shape[1]} "
          f"tokens in {out.prefill_s * 1e3:.0f} ms)")
    return new


def _with_routers(folder: Path, args: argparse.Namespace):
    """(elastic model, what its routers chose for --budget): per-op widths for static
    routers, a `RoutedDecoder` for dynamic or capacity ones (run as dynamic: one token at
    a time, with a key/value cache where `routed_hf` runs the family)."""
    from ..errors import CheckpointError
    from ..route.selection import load_routers, read_router_meta, router_folder
    from .checkpoint import META
    from .commands import check_router_args, router_budget, static_router_widths
    from .generate import RoutedDecoder

    check_router_args(args)
    if not (folder / META).is_file():
        raise CheckpointError(f"{folder} is no elastic run (no {META}); --routers choose "
                              "widths of the elastic model they were trained for")
    routers = router_folder(args.routers)
    static = read_router_meta(routers)["mode"] == "static"
    from .. import load

    em = load(folder)
    if static:
        return em, static_router_widths(em, routers, args.budget)
    _, table, _ = load_routers(em, routers, "dynamic")
    if table is None:
        raise CheckpointError(f"{args.routers} holds no cost table; retrain the routers")
    return em, RoutedDecoder(em, table, min(router_budget(table, args.budget), 1.0))


def _vocab(model) -> int:
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "vocab_size", None):
        return int(config.vocab_size)
    from ..trace import vocab_size

    return int(vocab_size(model.graph_module))


def _model(folder: Path, args: argparse.Namespace):
    """The sub-network: from an elastic run at the chosen widths, or a saved HF export."""
    from ..errors import CheckpointError, InputError
    from .checkpoint import META

    if (folder / META).is_file():
        from .. import load
        from .commands import _describe, _widths
        from .sliced import sliced_hf

        em = load(folder)
        if args.fraction is None and args.widths is None and args.budget is None:
            args.fraction = 1.0
        widths = _widths(em, args)
        print(f"widths: {_describe(em, widths)}")
        return sliced_hf(em, widths)
    if (folder / "config.json").is_file():
        if any(v is not None for v in (args.fraction, args.widths, args.budget)):
            raise InputError(f"{folder} holds one fixed sub-network (a Hugging Face export); "
                             "--fraction, --widths and --budget choose widths of an elastic "
                             "run (a folder with flextron.json)")
        from transformers import AutoModelForCausalLM

        try:
            return AutoModelForCausalLM.from_pretrained(folder).eval()
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{folder} does not load as a Hugging Face model: "
                                  f"{exc}") from exc
    raise CheckpointError(f"{folder} holds neither flextron.json (an elastic run) nor "
                          "config.json (a Hugging Face export)")


def _tokenizer(folder: Path, vocab: int, args: argparse.Namespace):
    from ..errors import InputError

    if args.tokenizer is None and ((folder / "tokenizer.json").is_file()
                                   or (folder / "tokenizer_config.json").is_file()):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)
    from ..models import tokenizer as load_tokenizer

    name = args.tokenizer or _BUNDLED
    try:
        tok = load_tokenizer(name)
    except ValueError as exc:  # an unknown name
        raise InputError(f"--tokenizer: {exc}") from exc
    if len(tok) > vocab:
        raise InputError(f"the {name} tokenizer has {len(tok)} tokens but the model only "
                         f"{vocab}; pass --tokenizer for this model's tokenizer, or the "
                         "prompt as --prompt-ids")
    return tok


def _prompt_ids(text: str | None) -> list[int] | None:
    from ..errors import InputError

    if text is None:
        return None
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError as exc:
        raise InputError(f"--prompt-ids takes integers separated by spaces, got "
                         f"{text!r}") from exc


def _prompt(ids: list[int], vocab: int):
    import torch

    from ..errors import InputError

    if not ids:
        raise InputError("the prompt is empty; give at least one token")
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise InputError(f"prompt token ids {bad[:5]} are outside the model's vocabulary "
                         f"(0..{vocab - 1})")
    return torch.tensor([ids])
