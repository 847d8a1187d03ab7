"""A thin wrapper over the `tokenizers` library plus the checkpoint's chat template.

Chat templates: we render the checkpoint's own Jinja template (from
`tokenizer_config.json` or `chat_template.jinja`) in Jinja's immutable sandbox,
the same way Hugging Face does. We chose this over built-in renderers because
the templates carry details a hand-written ChatML or Llama-3 renderer would get
subtly wrong (Qwen2.5's default system prompt, SmolLM2's default system prompt,
Llama-3.x's date header), and a classifier must see exactly the prompt format
its checkpoint was tuned on. The sandbox forbids attribute access to Python
internals, so a template cannot run code; nothing else in a checkpoint folder
is ever executed.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer


class TokenizerError(ValueError):
    """A tokenizer folder we cannot use; the message names the file and key."""


def _token_text(value) -> str | None:
    """Special tokens appear as strings or as {"content": ...} dicts in HF configs."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, path: str | Path):
        path = Path(path)
        self.path = path
        file = path / "tokenizer.json"
        if not file.is_file():
            raise TokenizerError(f"{path}: no tokenizer.json")
        try:
            self._tok = _HFTokenizer.from_file(str(file))
        except Exception as e:  # noqa: BLE001 (the Rust library raises a bare Exception naming no file)
            raise TokenizerError(f"{file}: cannot load: {e}") from None
        cfg = _read_json(path / "tokenizer_config.json")
        gen = _read_json(path / "generation_config.json")
        self.chat_template = _chat_template(path, cfg)
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        pad = _token_text(cfg.get("pad_token"))
        if self.eos_token is None:
            raise TokenizerError(f"{path / 'tokenizer_config.json'}: no eos_token")
        self.eos_token_id = self._id(self.eos_token, "eos_token")
        # generation_config.json may list several ids that end a turn (Llama-3:
        # <|eot_id|> and <|end_of_text|>); stop at any of them.
        gen_eos = gen.get("eos_token_id", [])
        gen_eos = gen_eos if isinstance(gen_eos, list) else [gen_eos]
        self.stop_token_ids = sorted({self.eos_token_id, *[int(i) for i in gen_eos if i is not None]})
        self.pad_token_id = self._id(pad, "pad_token") if pad is not None else self.eos_token_id
        self.bos_token_id = self._id(self.bos_token, "bos_token") if self.bos_token else None

    def _id(self, token: str, key: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise TokenizerError(f"{self.path}: {key} {token!r} is not in the vocabulary")
        return i

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def check_fits(self, num_embeddings: int, model_dir: str | Path | None = None) -> None:
        """Raise TokenizerError unless every id this tokenizer can produce indexes a row of the
        model's embedding table (`num_embeddings`, config.json's vocab_size).

        An id past the table fails far from its cause: a device-side assert on the GPU, or a
        silent wrong row. Checked: the vocabulary with added tokens, the special and stop ids
        (generation_config.json may list ids the vocabulary lacks), and a rendered chat.
        Fewer tokenizer ids than rows is fine (Qwen pads its table to a multiple of 128).
        """
        vocab = self._tok.get_vocab(with_added_tokens=True)
        ids = [("vocabulary (with added tokens)", max(vocab.values(), default=-1)),
               ("eos_token", self.eos_token_id), ("bos_token", self.bos_token_id), ("pad_token", self.pad_token_id),
               *[("stop token (generation_config.json)", i) for i in self.stop_token_ids]]
        if self.chat_template is not None:
            chat = [{"role": r, "content": c} for r, c in (("user", "hi"), ("assistant", "hello"), ("user", "bye"))]
            ids.append(("chat template's tokens", max(self.encode(self.apply_chat_template(chat)), default=-1)))
        need = max(i for _, i in ids if i is not None) + 1
        for what, i in ids:
            if i is not None and i >= num_embeddings:
                raise TokenizerError(
                    f"{model_dir or self.path}: the tokenizer in {self.path} does not fit the model: its {what} has id {i}, "
                    f"so it needs {need} embedding rows, but the model has {num_embeddings} (vocab_size in config.json)")

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens written in the text become their ids.

        No BOS is added: chat templates write their own.
        """
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render [{"role": ..., "content": ...}, ...] to the prompt text."""
        if self.chat_template is None:
            raise TokenizerError(f"{self.path}: the tokenizer has no chat_template (tokenizer_config.json or chat_template.jinja)")
        return _compile(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **kwargs,
        )


def _read_json(file: Path) -> dict:
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{file}: malformed JSON: {e}") from e


def _chat_template(path: Path, cfg: dict) -> str | None:
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default")
    return template


_COMPILED: dict[str, object] = {}


def _compile(template: str):
    if template not in _COMPILED:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TokenizerError(f"chat template: {message}")

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _COMPILED[template] = env.from_string(template)
    return _COMPILED[template]
