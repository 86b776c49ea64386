"""Serving many skills in one batch: a finished drex.train workdir loaded once, mixed requests answered together.

  server = Server("runs/task10")
  server.generate([Request("what is the answer ?", image="shape.png"),             # routed over all experts
                   Request("what colour is the shape ?", image="s.png", task="shape_color"),  # one task's expert
                   Request("one plus two . what is the answer ?", experts=["generic_add", "text_add"]),  # a subset
                   Request("describe the image .", image="s.png", experts=[])])     # the base alone

Every request of a batch is routed by its own selection in one compiled program: the workdir's router (its
config.router: level, k, temperature, null expert) restricted to the selected experts (the `allowed` variable
every inference router honours), or, for one task's expert or the base alone, fixed weights (`Selecting`, a
router that wraps the workdir's). Batches gather requests of similar prompt length and answer length; prompts
are left-padded to a length bucket and batches to a fixed size, so a handful of programs serve any stream of
requests (a batch without images skips the vision encoder); decoding is greedy with the KV cache, each answer cut
at its request's max_new_tokens and at the end of its turn. A request naming an unknown task, giving a field of the
wrong type or an unreadable image is answered with an error of its own; the others are answered.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Sequence

import flax
import jax.numpy as jnp
import numpy as np

from drex import workdir as workdir_lib
from drex.adapters import lora, prototypes, routers
from drex.data import images, record
from drex.errors import UserError
from drex.models.generation import jitted_greedy_generate


SMALLEST_PROMPT_BUCKET = 16  # the shortest length prompts are left-padded to (see prompt_bucket)
MAX_NEW_TOKENS = 1024  # the longest answer a request may ask for


@dataclasses.dataclass
class Request:
  """One question. `task`: that task's expert alone; `experts`: route among these task names ([] = the base
  alone); neither: routed over all the workdir's experts."""

  question: str
  image: str | list[str] | None = None  # image file(s) (paths or gs://); None for a text-only question
  task: str | None = None
  experts: list[str] | None = None
  max_new_tokens: int | None = None


routers.EXTRA_LEAVES.update({name: routers.Leaf(lambda d_in: ("activation_batch", None))
                             for name in ("fixed", "use_fixed")})


@dataclasses.dataclass(frozen=True)
class Selecting(routers.Router):
  """Each sequence's own selection: the inner router restricted to the `allowed` experts, or `fixed` weights
  (one expert's one-hot, or zeros for the base alone) where `use_fixed` is set. Variables per sequence:
  allowed [B, E], fixed [B, E], use_fixed [B, 1]."""

  KIND: ClassVar[str] = "selecting"
  inner: routers.Router

  @property
  def per_sequence(self) -> bool:
    return self.inner.per_sequence

  @property
  def per_sequence_experts(self) -> int:
    return self.inner.per_sequence_experts

  @property
  def top_k(self):
    return self.inner.top_k

  @property
  def includes_base(self):
    return self.inner.includes_base

  def reads(self):
    return self.inner.reads() + ("allowed", "fixed", "use_fixed")

  def prepare(self, model, variables, embeds, positions, kv_mask):
    return self.inner.prepare(model, variables, embeds, positions, kv_mask)

  def choose(self, x, token_mask, num_experts, variables, experts):
    chosen = self.inner.choose(x, token_mask, num_experts, variables, experts)
    fixed = jnp.pad(variables["fixed"], ((0, 0), (0, chosen.shape[-1] - num_experts)))
    return jnp.where(variables["use_fixed"] > 0, fixed, chosen)  # the gathered mixture then uses the fixed expert

  def gates(self, x, num_experts, variables, experts, chosen=None):
    inner = (self.inner.gates(x, num_experts, variables, experts, chosen) if self.inner.per_sequence
             else self.inner.gates(x, num_experts, variables, experts))
    use_fixed = variables["use_fixed"][:, None, :] > 0  # [B, 1, 1]
    return jnp.where(use_fixed, variables["fixed"][:, None, :], inner)


@dataclasses.dataclass(frozen=True)
class FixedOnly(routers.Router):
  """The inner router of a batch whose every request names its expert or the base (`Selecting` then uses
  their `fixed` weights alone): nothing to score, no identifying pass."""

  KIND: ClassVar[str] = "fixed_only"
  PER_SEQUENCE: ClassVar[bool] = True

  @property
  def per_sequence_experts(self) -> int:
    return 1

  def choose(self, x, token_mask, num_experts, variables, experts):
    return jnp.zeros((x.shape[0], num_experts), jnp.float32)

  def gates(self, x, num_experts, variables, experts, chosen=None):
    return jnp.zeros(x.shape[:-1] + (num_experts,), jnp.float32)


def prompt_bucket(length: int) -> int:
  """The length a prompt of `length` tokens is left-padded to (drex.generate.ask too): the next of 16, 24, 32, 48,
  64, 96, ... (two lengths per octave), so a handful of programs serve any prompts and padding stays under a third
  of a batch (a multiple of 32 padded the tiny base's 44-token image prompts to 64)."""
  bucket = SMALLEST_PROMPT_BUCKET
  while bucket < length:
    bucket = bucket * 3 // 2 if bucket & (bucket - 1) == 0 else bucket // 3 * 4  # 2^k -> 1.5 * 2^k -> 2^(k+1)
  return bucket


def _steps(max_new_tokens: int) -> int:
  """Decoding steps of a batch: the next power of two (few compiled programs)."""
  return 1 << (max_new_tokens - 1).bit_length()


class Server:
  """A workdir's base, experts and router, loaded once; `generate` answers lists of requests."""

  def __init__(self, workdir: str, batch_size: int = 16, max_new_tokens: int = 0):
    """max_new_tokens: the answer length of requests that give none (0: the run's data.max_new_tokens)."""
    self.workdir, self.batch_size = workdir, batch_size
    self.base, variables, self.cfg, self.tasks = workdir_lib.load_routed(workdir)
    self.max_new_tokens = max_new_tokens or self.cfg.data.max_new_tokens
    self.experts, self.vectors = variables["experts"], variables["router"]
    self.router = routers.from_config(self.cfg.router, len(self.tasks))
    c = self.cfg.lora
    self.model = self.base.model(lora.AdapterSpec(Selecting(self.router), c.lora_alpha, c.rslora, c.kernel))
    self.fixed_model = self.base.model(lora.AdapterSpec(Selecting(FixedOnly()), c.lora_alpha, c.rslora, c.kernel))
    self.encoder = self.base.encoder(self.cfg.data.max_tiles)  # the tiling the run trained and evaluated with
    self.paths = sorted({path[:-1] for path in flax.traverse_util.flatten_dict(self.vectors)})
    self.identification: dict[str, dict] = {}  # class name -> its statistics (router 'identify')
    if "id_w" in self.router.reads():
      names = workdir_lib.identification_classes(self.cfg, self.tasks)  # every class a request can use
      self.identification = workdir_lib.identification_moments(workdir, self.cfg, names)
    self._discriminants: dict[tuple[str, ...], dict] = {}

  # -- one request
  def selection(self, request: Request) -> tuple[list[str], np.ndarray, np.ndarray, float]:
    """(the task names used, allowed [E], fixed [E], use_fixed) of a request; a UserError for unknown names."""
    e = len(self.tasks)
    known = ", ".join(self.tasks)
    if request.task is not None and not isinstance(request.task, str):
      raise UserError(f"'task' must be a task name, got {request.task!r}")
    if request.experts is not None and (not isinstance(request.experts, list)
                                        or not all(isinstance(t, str) for t in request.experts)):
      raise UserError(f"'experts' must be a list of task names, got {request.experts!r}")
    if request.task is not None and request.experts is not None:
      raise UserError("a request names both 'task' and 'experts'; give one")
    if request.task is not None:
      if request.task not in self.tasks:
        raise UserError(f"unknown task {request.task!r}; this workdir's tasks: {known}")
      one = np.eye(e, dtype=np.float32)[self.tasks.index(request.task)]
      return [request.task], one, one, 1.0
    if request.experts is not None:
      unknown = [t for t in request.experts if t not in self.tasks]
      if unknown:
        raise UserError(f"unknown tasks {unknown} in 'experts'; this workdir's tasks: {known}")
      if not request.experts:
        return [], np.zeros(e, np.float32), np.zeros(e, np.float32), 1.0
      allowed = np.asarray([t in request.experts for t in self.tasks], np.float32)
      return [t for t in self.tasks if t in request.experts], allowed, np.zeros(e, np.float32), 0.0
    return list(self.tasks), np.ones(e, np.float32), np.zeros(e, np.float32), 0.0

  def _prepare(self, request: Request) -> dict:
    if not isinstance(request.question, str) or not request.question.strip():
      raise UserError("a request needs a non-empty 'question'")
    limit = request.max_new_tokens if request.max_new_tokens is not None else self.max_new_tokens
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_NEW_TOKENS:
      raise UserError(f"'max_new_tokens' must be an integer from 1 to {MAX_NEW_TOKENS}, got {limit!r}")
    used, allowed, fixed, use_fixed = self.selection(request)
    paths = [] if request.image is None else [request.image] if isinstance(request.image, str) else request.image
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
      raise UserError(f"'image' must be a path or a list of paths, got {request.image!r}")
    question = record.make([(request.question, "")], [images.load_image(p) for p in paths])
    pixels, tiles = self.encoder.pixels(question["images"])
    prompt = self.encoder.prompt_ids(question, tiles)
    return {"pixels": pixels, "has_image": bool(tiles), "prompt": prompt, "allowed": allowed, "fixed": fixed,
            "use_fixed": use_fixed, "max_new_tokens": limit, "experts": used}

  # -- batches
  def discriminants(self, tasks: tuple[str, ...]) -> dict[tuple[str, ...], dict[str, np.ndarray]]:
    """Router 'identify' among `tasks` and the base, as drex.evaluate identifies in a stream of those tasks
    alone (the shared covariance of their classes), laid out over all the workdir's experts, then one base row
    per foundation member: {path: {'id_w' [E + F, d_in], 'id_b' [E + F, 1]}}. Rows of experts outside `tasks`
    are excluded by the request's `allowed`; rows of no class here (a foundation member that is one of
    `tasks`) can never win (bias -1e30)."""
    if tasks not in self._discriminants:
      names = workdir_lib.identification_classes(self.cfg, tasks)
      e, foundation = len(self.tasks), list(self.cfg.foundation)
      rows = [self.tasks.index(n) if n in tasks else e + foundation.index(n) for n in names]
      made = prototypes.discriminants({n: self.identification[n] for n in names}, self.cfg.router.identify_shrinkage)
      laid = {}
      for path, leaves in made.items():
        w = np.zeros((e + len(foundation), leaves["id_w"].shape[1]), np.float32)
        b = np.full((e + len(foundation), 1), -1e30, np.float32)
        w[rows], b[rows] = leaves["id_w"], leaves["id_b"]
        laid[tuple(path.split("/"))] = {"id_w": w, "id_b": b}
      self._discriminants[tasks] = laid
    return self._discriminants[tasks]

  def _variables(self, rows: list[dict]) -> dict:
    per_sequence = {"allowed": np.stack([r["allowed"] for r in rows]), "fixed": np.stack([r["fixed"] for r in rows]),
                    "use_fixed": np.asarray([[r["use_fixed"]] for r in rows], np.float32)}
    flat = flax.traverse_util.flatten_dict(self.vectors)
    for path in self.paths:
      for name, value in per_sequence.items():
        flat[path + (name,)] = value
    if self.identification:  # each request identifies among its own selection (all tasks by default)
      chosen = [self.discriminants(tuple(r["experts"]) if r["experts"] else tuple(self.tasks)) for r in rows]
      for path in chosen[0]:
        for name in ("id_w", "id_b"):
          flat[path + (name,)] = np.stack([c[path][name] for c in chosen])
    return {"params": self.base.params, "experts": self.experts, "router": flax.traverse_util.unflatten_dict(flat)}

  def _answer(self, rows: list[dict]) -> list[str]:
    """Greedy answers of up to batch_size prepared rows (padded to batch_size, prompts to a bucket)."""
    filled = rows + [rows[0]] * (self.batch_size - len(rows))
    length = prompt_bucket(max(len(r["prompt"]) for r in filled))
    ids, mask = (np.stack(column) for column in zip(*(self.encoder.left_pad(r["prompt"], length) for r in filled)))
    steps = _steps(max(r["max_new_tokens"] for r in rows))
    model = self.fixed_model if all(r["use_fixed"] for r in filled) else self.model
    pixels = np.stack([r["pixels"] for r in filled]) if any(r["has_image"] for r in filled) else None  # no ViT pass
    tokens = jitted_greedy_generate(model, self._variables(filled), pixels, ids, mask, steps, self.encoder.eos_id,
                                    self.encoder.pad_id)
    tokens = np.asarray(tokens)
    return [self.encoder.decode_answer(tokens[i, :r["max_new_tokens"]]) for i, r in enumerate(rows)]

  def generate(self, requests: Sequence[Request], progress=None) -> list[dict]:
    """Answers in request order: {'answer', 'experts'} or {'error'}. `progress(n)` is called as answers come."""
    out: list[dict | None] = [None] * len(requests)
    ready = []
    for i, request in enumerate(requests):
      try:
        ready.append((i, self._prepare(request)))
      except UserError as e:  # images.ImageError is one too
        out[i] = {"error": str(e)}
        if progress:
          progress(1)
    ready.sort(key=lambda item: (_steps(item[1]["max_new_tokens"]),  # similar answer and prompt lengths together,
                                 prompt_bucket(len(item[1]["prompt"])), item[1]["has_image"]))  # text-only together
    for start in range(0, len(ready), self.batch_size):
      chunk = ready[start:start + self.batch_size]
      for (i, row), answer in zip(chunk, self._answer([row for _, row in chunk])):
        out[i] = {"answer": answer, "experts": row["experts"]}
      if progress:
        progress(len(chunk))
    return out
