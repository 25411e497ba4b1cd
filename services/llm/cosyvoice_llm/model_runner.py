"""`ModelRunner`: the device side of the engine - per-slot decoding state, the prefill and decode functions, their
CUDA graphs, and the one device-to-host copy per step.

Every piece of per-slot state (last id, position, generated count, repetition window, sampling parameters) lives
in preallocated device tensors that the two static-shape functions update in place, so a captured graph always
sees the same storage:

- `_prefill_rows`: ids right-padded to a length bucket, rows padded to a rows bucket (padding rows are one-id
  prompts in the scratch slot), positions 0..L-1, causal over the new keys only; samples each row's first id.
  Every prefill runs at those bucket shapes, captured (CUDA) or eagerly (CPU: the shapes the graphs run); a prompt
  past the last length bucket runs unpadded, eagerly. Padding writes land past each request's length, where
  decode overwrites them before they become visible.
- `_decode_rows`: one step over the slot prefix [0, n) that holds every running request, attending over cache
  positions [0, kv_len), the smallest kv bucket covering every running position. Rows of the prefix that are free
  still compute (static shapes), but their `active` flag is 0, so their state does not move and what they write
  lands in their own, unused cache row. Captured per (batch bucket, kv bucket), optionally after torch.compile.

Sampling: `sampling.sample_batched` (counter-based, per-request seed), so a request's ids do not depend on the
batch it shares; it is not torch.multinomial's stream (`Qwen2LM.inference` draws as the reference). The nucleus is looked for among the `sampling_top_k_cap` likeliest ids (one top-k, the same
draws as the full sort); a step or prefill with a request whose top_k exceeds the cap sorts fully, eagerly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence as Seq

import torch

from cosyvoice_common.constants import FLAT_SOS_ID
from cosyvoice_common.stage_params import LLMParams

from .capacity import Capacity
from .model import Qwen2LM
from .sampling import BatchSamplingParams, mask_eos, precompute_noise_tables, push_history, sample_batched, seed_keys
from .sequence import Sequence

HISTORY_WIDTH_TOKENS = 32   # the largest repetition window (win_size) a request may ask for
_DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_MIN_KV_BUCKET = 128        # the smallest default attended cache length; then doubling up to max_seq_len
# Default prefill length buckets: every 32 tokens up to 256, then every 64 up to 512 (capped at max_seq_len).
_PREFILL_LEN_FINE_STEP, _PREFILL_LEN_FINE_END = 32, 256
_PREFILL_LEN_COARSE_STEP, _PREFILL_LEN_COARSE_END = 64, 512

# Columns of the per-row prefill parameter tensors.
_PF_TOP_K, _PF_WIN, _PF_MIN_REP, _PF_SEED, _PF_MIN_NEW, _PF_LEN, _PF_SLOT = range(7)
_PF_INT_COLS = 7
_PF_TOP_P, _PF_TEMP = range(2)
_PF_FLOAT_COLS = 2


def decode_buckets(num_slots: int, given: Seq[int] = ()) -> tuple[int, ...]:
    base = given or tuple(b for b in _DEFAULT_BATCH_BUCKETS if b < num_slots)
    if any(b > num_slots for b in base):
        raise ValueError(f"batch_buckets {tuple(given)} must lie in [1, {num_slots}] (the slots)")
    return tuple(sorted(set(base) | {num_slots}))


def kv_lengths(max_seq_len: int, given: Seq[int] = ()) -> tuple[int, ...]:
    base = given or tuple(_MIN_KV_BUCKET << i for i in range(32) if _MIN_KV_BUCKET << i < max_seq_len)
    return tuple(sorted(set(base) | {max_seq_len}))


def prefill_lengths(max_seq_len: int, given: Seq[int] = ()) -> tuple[int, ...]:
    base = tuple(given)
    if not base:
        base = (tuple(range(_PREFILL_LEN_FINE_STEP, _PREFILL_LEN_FINE_END + 1, _PREFILL_LEN_FINE_STEP))
                + tuple(range(_PREFILL_LEN_FINE_END + _PREFILL_LEN_COARSE_STEP, _PREFILL_LEN_COARSE_END + 1,
                              _PREFILL_LEN_COARSE_STEP)))
        base = tuple(b for b in base if b < max_seq_len) + (min(max_seq_len, base[-1]),)
    return tuple(sorted(set(base)))


@dataclass(slots=True)
class DecodeLaunch:
    """A decode step on the device whose sampled ids the host has not read yet."""
    rows: int                                # batch bucket (slots [0, rows))
    sequences: list[Sequence]                # the running sequences it advanced
    host: torch.Tensor                       # where its sampled ids land (pinned on CUDA)
    event: "torch.cuda.Event | None"         # recorded after the copy (CUDA)


class ModelRunner:
    def __init__(self, model: Qwen2LM, settings: LLMParams, num_slots: int) -> None:
        self.model = model.eval()
        self.device = dev = model.llm_decoder.weight.device
        cuda = dev.type == "cuda"
        self.use_graphs = settings.cuda_graphs and cuda
        self.capture_prefill = self.use_graphs and settings.prefill_graphs
        self.compile_decode = settings.compile_decode
        self.num_slots = num_slots
        self.scratch_slot = num_slots          # one cache and state row past the slots: padding rows write there
        model.setup_caches(num_slots + 1, settings.max_seq_len)
        self.max_seq_len = model.llm.backbone.max_seq_len   # may exceed ours if the model's cache was bigger
        model.llm.backbone.fuse_projections()
        precompute_noise_tables(model.llm_config.speech_head_size, dev)
        self.decode_buckets = decode_buckets(num_slots, settings.batch_buckets)
        self.kv_lens = kv_lengths(settings.max_seq_len, settings.kv_buckets)
        self.prefill_rows = tuple(sorted(set(settings.prefill_batch_buckets)))
        self.prefill_lens = prefill_lengths(settings.max_seq_len, settings.prefill_len_buckets)
        self.top_k_cap = settings.sampling_top_k_cap

        i64 = dict(dtype=torch.int64, device=dev)
        rows = num_slots + 1
        self._tokens = torch.zeros(rows, **i64)           # last sampled id, fed at the next step
        self._positions = torch.zeros(rows, **i64)        # where that id goes in the cache
        self._generated = torch.zeros(rows, **i64)        # ids sampled so far (the noise counter)
        self._min_new = torch.zeros(rows, **i64)
        self._active = torch.zeros(rows, **i64)           # 1 = running; 0 rows compute but do not advance
        self._history = torch.full((rows, HISTORY_WIDTH_TOKENS), -1, **i64)
        self._sampled = torch.zeros(rows, **i64)          # this step's draws (what the host copies back)
        self._params = BatchSamplingParams(
            top_p=torch.ones(rows, dtype=torch.float32, device=dev), top_k=torch.ones(rows, **i64),
            temperature=torch.ones(rows, dtype=torch.float32, device=dev), win_size=torch.ones(rows, **i64),
            min_repeats=torch.ones(rows, **i64), seeds=torch.zeros(rows, **i64),
            seed_keys=seed_keys(torch.zeros(rows, **i64)))
        # The one device-to-host copy per step lands in pinned memory (CUDA); two buffers, so a step launched
        # ahead never overwrites the copy the host is still reading.
        self._host_sampled = [torch.zeros(rows, dtype=torch.int64, pin_memory=cuda) for _ in range(2)]
        self._host_events = [torch.cuda.Event() if cuda else None for _ in range(2)]
        self._host_flip = 0
        # Static prefill inputs: ids [rows x len] flat, so every (rows, len) view is contiguous; per-row ints
        # (top_k, win_size, min_repeats, seed, min_new, length, slot) and floats (top_p, temperature); and their
        # host staging twins (pinned on CUDA): one upload per tensor per prefill group.
        max_rows, max_len = self.prefill_rows[-1], self.prefill_lens[-1]
        self._pf_ids = torch.zeros(max_rows * max_len, **i64)
        self._pf_ints = torch.zeros(max_rows, _PF_INT_COLS, **i64)
        self._pf_floats = torch.ones(max_rows, _PF_FLOAT_COLS, dtype=torch.float32, device=dev)
        self._pf_tokens = torch.zeros(max_rows, **i64)
        self._pf_host = (torch.zeros(max_rows * max_len, dtype=torch.int64, pin_memory=cuda),
                         torch.zeros(max_rows, _PF_INT_COLS, dtype=torch.int64, pin_memory=cuda),
                         torch.ones(max_rows, _PF_FLOAT_COLS, dtype=torch.float32, pin_memory=cuda))
        self._arange = torch.arange(max(self.max_seq_len, max_rows), **i64)

        self._step_fn = self._decode_rows
        if settings.compile_decode:
            self._step_fn = torch.compile(self._decode_rows, dynamic=True)
        self._decode_graphs: dict[int, dict[int, torch.cuda.CUDAGraph]] = {}   # batch bucket -> kv bucket -> graph
        self._prefill_graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}   # (rows, len) -> graph

    @property
    def capacity(self) -> Capacity:
        """Slots, positions per slot and the KV cache's bytes (all cache rows, the scratch one included)."""
        cache = self.model.llm.backbone.layers[0].self_attn.kv_cache
        layers = len(self.model.llm.backbone.layers)
        kv_bytes = 2 * layers * cache.k_cache.numel() * cache.k_cache.element_size()
        return Capacity(self.num_slots, self.max_seq_len, kv_bytes)

    def needs_full_sort(self, top_k: int) -> bool:
        return self.top_k_cap == 0 or top_k > self.top_k_cap

    def deactivate(self, slot: int) -> None:
        """The slot's request ended: its row stops advancing (a prefill resets all its state before reuse)."""
        self._active[slot] = 0

    # --- prefill --------------------------------------------------------------------------------------------------
    def prefill_shape(self, rows: int, length: int) -> tuple[int, int]:
        """The (rows, length) a prefill of `rows` prompts of at most `length` ids runs as: the buckets (a length
        past the last bucket runs unpadded)."""
        return (next(b for b in self.prefill_rows if b >= rows),
                next((b for b in self.prefill_lens if b >= length), length))

    def prefill(self, group: Seq[Sequence]) -> list[int]:
        """Prefills `group` (already holding their slots) in one forward, resets their slots' state and returns
        each one's first sampled id."""
        lens = [len(seq.request.input_ids) for seq in group]
        rows, length = self.prefill_shape(len(group), max(lens))
        full_sort = any(seq.full_sort for seq in group)
        fits = length <= self.prefill_lens[-1]
        if fits:   # the static staging buffers
            ids_host = self._pf_host[0][:rows * length].view(rows, length)
            ints_host, floats_host = self._pf_host[1][:rows], self._pf_host[2][:rows]
        else:      # a prompt past the last length bucket: once per such prefill
            ids_host = torch.empty((rows, length), dtype=torch.int64)
            ints_host = torch.empty(rows, _PF_INT_COLS, dtype=torch.int64)
            floats_host = torch.empty(rows, _PF_FLOAT_COLS, dtype=torch.float32)
        ids_host.fill_(FLAT_SOS_ID)
        floats_host.fill_(1.0)
        ints_host.fill_(1)
        ints_host[:, _PF_SEED] = 0
        ints_host[:, _PF_MIN_NEW] = 0
        ints_host[:, _PF_SLOT] = self.scratch_slot
        for i, seq in enumerate(group):
            req, sp = seq.request, seq.request.sampling
            ids_host[i, :lens[i]] = torch.tensor(req.input_ids, dtype=torch.int64)
            ints_host[i] = torch.tensor([sp.top_k, sp.win_size, sp.min_repeats, req.seed, req.min_new_tokens,
                                         lens[i], seq.slot], dtype=torch.int64)
            floats_host[i, _PF_TOP_P], floats_host[i, _PF_TEMP] = sp.top_p, sp.temperature
        if fits:
            ids, ints, floats = self._prefill_inputs(rows, length)
            ids.copy_(ids_host, non_blocking=True)
            ints.copy_(ints_host, non_blocking=True)
            floats.copy_(floats_host, non_blocking=True)
        else:
            dev = self.device
            ids, ints, floats = (ids_host.to(dev, non_blocking=True), ints_host.to(dev, non_blocking=True),
                                 floats_host.to(dev, non_blocking=True))
        graph = None if full_sort else self._prefill_graphs.get((rows, length))
        if graph is not None:
            graph.replay()
            tokens = self._pf_tokens[:len(group)]
        else:
            tokens = self._prefill_rows(ids, ints, floats, full_sort)[:len(group)]
        return tokens.tolist()   # the one device-to-host copy of this prefill

    def _prefill_inputs(self, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Contiguous views of the static prefill inputs for one (rows, length) shape."""
        return (self._pf_ids[:rows * length].view(rows, length), self._pf_ints[:rows], self._pf_floats[:rows])

    def _top_k_cap(self, full_sort: bool) -> int | None:
        return None if full_sort or self.top_k_cap == 0 else self.top_k_cap

    def _prefill_rows(self, ids: torch.Tensor, ints: torch.Tensor, floats: torch.Tensor,
                      full_sort: bool = False) -> torch.Tensor:
        """The static-shape prefill: ids [R, L] (right-padded), per-row ints/floats (the _PF_* columns) -> writes
        the rows' caches and decoding state, samples their first ids into `_pf_tokens[:R]` and returns that view.
        Device work only (no sync, no allocation visible outside), so it can be captured."""
        n_rows, length = ids.shape
        model, p = self.model, self._params
        slots = ints[:, _PF_SLOT]
        lens = ints[:, _PF_LEN]
        row_params = BatchSamplingParams(top_p=floats[:, _PF_TOP_P], top_k=ints[:, _PF_TOP_K],
                                         temperature=floats[:, _PF_TEMP], win_size=ints[:, _PF_WIN],
                                         min_repeats=ints[:, _PF_MIN_REP], seeds=ints[:, _PF_SEED],
                                         seed_keys=seed_keys(ints[:, _PF_SEED]))
        p.top_p[slots], p.temperature[slots] = row_params.top_p, row_params.temperature
        p.top_k[slots], p.win_size[slots], p.min_repeats[slots] = (row_params.top_k, row_params.win_size,
                                                                   row_params.min_repeats)
        p.seeds[slots], p.seed_keys[slots] = row_params.seeds, row_params.seed_keys
        self._min_new[slots] = ints[:, _PF_MIN_NEW]
        positions = self._arange[:length].expand(n_rows, length)
        hidden = model.llm.backbone(model.embed_flat(ids), positions, slots, fresh=True)
        logp = model.speech_logp(hidden[self._arange[:n_rows], lens - 1])
        generated = torch.zeros_like(lens)
        logp = mask_eos(logp, generated < ints[:, _PF_MIN_NEW])
        history = torch.full((n_rows, HISTORY_WIDTH_TOKENS), -1, dtype=torch.int64, device=ids.device)
        tok = sample_batched(logp, history, generated, row_params, self._top_k_cap(full_sort))
        self._tokens[slots] = tok
        self._positions[slots] = lens
        self._history[slots] = push_history(history, tok)
        self._generated[slots] = generated + 1
        self._active[slots] = torch.ones_like(lens)
        out = self._pf_tokens[:n_rows]
        out.copy_(tok)
        return out

    # --- decode ---------------------------------------------------------------------------------------------------
    def decode_shape(self, running: Seq[Sequence], ahead: int = 0) -> tuple[int, int]:
        """(batch bucket, kv bucket) of a decode step over `running`: the slot prefix holding all of them, and the
        smallest kv bucket covering every one's next position. `ahead`: steps launched whose ids the host has not
        read yet (their positions are not in the host mirror)."""
        rows = max(seq.slot for seq in running) + 1
        need = max(seq.next_position for seq in running) + 1 + ahead
        return (next(b for b in self.decode_buckets if b >= rows),
                next((b for b in self.kv_lens if b >= need), self.max_seq_len))

    def launch_decode(self, running: list[Sequence], ahead: int, full_sort: bool) -> DecodeLaunch:
        """Enqueues one decode step over the running slots and the copy of its ids to a host buffer."""
        rows, kv_len = self.decode_shape(running, ahead)
        if full_sort:
            self._decode_rows(rows, kv_len, full_sort=True)   # eager: the graphs sample with the top-k cap
        else:
            graph = self._decode_graphs.get(rows, {}).get(kv_len)
            if graph is not None:
                graph.replay()
            else:
                self._step_fn(rows, kv_len)
        flip = self._host_flip
        self._host_flip ^= 1
        host, event = self._host_sampled[flip], self._host_events[flip]
        # The one device-to-host copy per step (pinned and asynchronous on CUDA; waited for by `read`).
        host[:rows].copy_(self._sampled[:rows], non_blocking=event is not None)
        if event is not None:
            event.record()
        return DecodeLaunch(rows, running, host, event)

    @staticmethod
    def read(launch: DecodeLaunch) -> list[int]:
        """The launched step's sampled ids, by slot (waits for its copy)."""
        if launch.event is not None:
            launch.event.synchronize()
        return launch.host[:launch.rows].tolist()

    def _decode_rows(self, n: int, kv_len: int | None = None, full_sort: bool = False) -> None:
        """The static decode step over slots [0, n), attending over cache positions [0, kv_len): reads and writes
        only preallocated state."""
        rows = slice(0, n)
        model, p = self.model, self._params
        embeds = model.speech_embedding(self._tokens[rows])[:, None]
        hidden = model.llm.backbone(embeds, self._positions[rows][:, None], rows, kv_len=kv_len)
        logp = model.speech_logp(hidden[:, 0])
        logp = mask_eos(logp, self._generated[rows] < self._min_new[rows])
        row_params = BatchSamplingParams(top_p=p.top_p[rows], top_k=p.top_k[rows], temperature=p.temperature[rows],
                                         win_size=p.win_size[rows], min_repeats=p.min_repeats[rows],
                                         seeds=p.seeds[rows], seed_keys=p.seed_keys[rows])
        tok = sample_batched(logp, self._history[rows], self._generated[rows], row_params,
                             self._top_k_cap(full_sort))
        act = self._active[rows]
        moving = act.bool()
        self._sampled[rows] = tok
        self._tokens[rows] = torch.where(moving, tok, self._tokens[rows])
        self._history[rows] = torch.where(moving[:, None], push_history(self._history[rows], tok),
                                          self._history[rows])
        self._positions[rows] += act
        self._generated[rows] += act

    # --- CUDA graphs ----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def capture_graphs(self) -> None:
        """Records the decode step for every (batch bucket, kv bucket), and (`prefill_graphs`) the prefill for
        every (rows bucket, length bucket). Free rows are inactive, and prefill warm-up/capture rows all point at
        the scratch slot, so capture leaves the slots' state unchanged. Call only while no request is running."""
        if self._decode_graphs:
            return   # already captured (start() after stop())
        shapes = [(n, kv) for n in sorted(self.decode_buckets, reverse=True)
                  for kv in sorted(self.kv_lens, reverse=True)]
        prefill_shapes = [(r, ln) for r in sorted(self.prefill_rows, reverse=True)
                          for ln in sorted(self.prefill_lens, reverse=True)] if self.capture_prefill else []
        self._pf_ids.fill_(FLAT_SOS_ID)
        self._pf_ints.fill_(1)
        self._pf_ints[:, _PF_SEED] = 0
        self._pf_ints[:, _PF_MIN_NEW] = 0
        self._pf_ints[:, _PF_SLOT] = self.scratch_slot
        self._pf_floats.fill_(1.0)
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for n, kv in shapes:
                for _ in range(2 if self.compile_decode else 1):
                    self._step_fn(n, kv)   # warm-up: lazy kernels/workspaces (and compilation) outside the capture
            for r, ln in prefill_shapes:
                self._prefill_rows(*self._prefill_inputs(r, ln))
        torch.cuda.current_stream().wait_stream(side)
        for n, kv in shapes:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):   # other threads may run CUDA
                self._step_fn(n, kv)
            self._decode_graphs.setdefault(n, {})[kv] = graph
        for r, ln in prefill_shapes:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                self._prefill_rows(*self._prefill_inputs(r, ln))
            self._prefill_graphs[(r, ln)] = graph
        torch.cuda.synchronize()
