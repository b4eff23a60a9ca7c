"""Planted mutations for ``make mutants`` (run by tests/mutants/run.py).

Each mutant replaces one exact snippet of one library file (the snippet must occur exactly
once, or the mutant is reported as an ERROR: the code moved, update the snippet). ``judgement``
is what a survivor means: ``equivalent: ...`` for a mutant that cannot change any number or
behaviour a test may observe, ``gap: ...`` for a change that a test should have caught.
``tests`` names the subset (see SUBSETS) run against the mutant.
"""

from __future__ import annotations

from typing import NamedTuple


class Mutant(NamedTuple):
    id: str
    file: str
    original: str
    replacement: str
    description: str
    judgement: str
    tests: str = "core"


CB = "memopt_func/critical_buffer.py"
SLOTS = "memopt_func/_slot_write.py"
CRIT = "memopt_func/_critical.py"
MATH = "memopt_func/_math.py"
STEPPER = "memopt_func/compiled/stepper.py"
STORAGE = "memopt_func/storage.py"
CODES = "memopt_func/_codes.py"
SHARDING = "memopt_func/sharding.py"
MIGRATE = "memopt_func/migrate.py"
CHECKPOINT = "memopt_func/checkpoint.py"
OPTIM = "memopt_func/optim.py"

# Fast test subsets, most discriminating files first (a run stops at the first failure). "core"
# is eager only (the flat Stepper uncompiled, which takes the donated in-place path): a mutant
# changes the compiled graphs, and recompiling them would cost minutes per mutant. Entries that
# no longer exist are dropped with a warning (the other tests' names are not ours to fix here).
SUBSETS = {
    "core": [
        "tests/test_critical_buffer_cases.py",
        "properties/test_prop_priorities.py",
        "tests/test_spec_oracle.py",
        "tests/test_field_ready.py::test_one_nonfinite_element_leaves_the_healthy_tensors_as_if_that_tensor_had_no_gradient",
        "tests/test_field_ready.py::test_a_tensor_that_stays_nan_does_not_stop_the_group_buffer",
        "tests/test_field_ready.py::test_nonfinite_per_tensor_rows_are_refused",
        "tests/test_reference_rules.py",
        "tests/test_parity_torch_optim.py",
        "tests/test_reductions.py",
        "tests/test_compiled_runs.py::test_flat_stepper_over_bias_free_layers_equals_eager_rule_when_the_buffer_decides[flat-eager]",
        "properties/test_prop_admission_model.py",
        "properties/test_prop_eager_equals_compiled.py::test_invariant_eager_equals_flat_stepper",
        "tests/test_compiled_buffers.py",
        "properties/test_prop_host_slots.py",
        "properties/test_prop_buffer_invariants.py",
        "tests/test_field_ready.py::test_buf_sum_stays_exact_over_a_falling_scale_sweep",
        "tests/test_dropin_nosync.py::test_device_form_of_sgd_first_step_starts_the_buffer_at_d_as_torch_optim",
    ],
    "chunked": [
        "tests/test_chunked.py",
        "tests/test_dropin_state.py::test_state_changed_by_hand_between_steps_is_checked_again",
    ],
    "recipe": [
        "tests/test_compile_recipe.py::test_recipe_refuses_a_structural_change_and_applies_a_neutral_one_like_eager",
        "tests/test_compile_recipe.py::test_recipe_compiles_no_worse_than_adamw_and_matches_eager",
    ],
    "codegen": ["tests/test_cpu_codegen.py"],
    # state_dicts, random streams and storage: the golden checkpoints first (seconds), then the
    # storage tests (a minute and a half)
    "checkpoint": [
        "tests/test_random_streams.py",
        "tests/test_golden_checkpoints.py",
        "properties/test_prop_checkpoints.py",
        "tests/test_dropin_state.py",
        "tests/test_storage.py",
        "properties/test_prop_storage.py",
    ],
    "migrate": ["tests/test_migrate.py", "tests/test_golden_checkpoints.py"],
    # the eager drop-ins' grouped (flat, uncompiled) step on an accelerator, run on CPU tensors
    "grouped": ["tests/test_grouped_steps.py", "tests/test_launches.py::test_a_flat_group_launches_the_same_whatever_the_tensor_sizes"],
    # two gloo processes: sharded priorities against one process, and skews that catch a wrong
    # combination of the shards' norms
    "sharding": [
        "tests/test_distributed.py::test_skew_catches_wrong_norm_combinations",
        "tests/test_distributed.py::test_skewed_shards_take_the_full_norm",
        "tests/test_distributed.py::test_replicated_dtensors_take_no_collective",
        "tests/test_distributed.py::test_matches_one_process",
    ],
    "stepper": [
        "tests/test_compiled_runs.py",
        "tests/test_compiled_buffers.py",
        "properties/test_prop_eager_equals_compiled.py::test_invariant_eager_equals_flat_stepper",
        "tests/test_compiled.py",
    ],
}

MUTANTS: list[Mutant] = [
    # ------------------------------------------------------------------ critical_buffer: priority
    Mutant(
        "cb-run-norm", CB,
        "parts.append(torch.linalg.vector_norm(block, dim=1, dtype=state.keys.dtype))",
        "parts.append(torch.linalg.vector_norm(block, dtype=state.keys.dtype).expand(count) / count)",
        "one norm over a whole run of equal-sized tensors (issue 16's planted bug), shared by its tensors",
        "gap: a synced priority over a flat run must be the sum of per-tensor norms",
    ),
    Mutant(
        "cb-norm-ord", CB,
        "grads, 2, dtype=state.keys.dtype)",
        "grads, 1, dtype=state.keys.dtype)",
        "L1 instead of L2 norm per tensor",
        "gap: priorities are L2 norms",
    ),
    Mutant(
        "cb-synced-global-norm", CB,
        "return torch.where(M.finite(norms) if finite is None else finite, norms, 0).sum().reshape(1)",
        "return torch.where(M.finite(norms) if finite is None else finite, norms, 0).norm().reshape(1)",
        "synced priority: the global norm instead of the sum of norms",
        "gap: SPEC says the synced priority is the sum of norms, not the global norm",
    ),
    Mutant(
        "cb-nonfinite-sum", CB,
        "return torch.where(M.finite(norms) if finite is None else finite, norms, 0).sum().reshape(1)",
        "return norms.sum().reshape(1)",
        "a non-finite norm is kept in the synced sum",
        "gap: a NaN/inf tensor must take no part in the synced priority",
    ),
    # ------------------------------------------------------------------ critical_buffer: decide
    Mutant(
        "cb-ties-admit", CB,
        "admitted = ~full | (nu > key_at_slot)",
        "admitted = ~full | (nu >= key_at_slot)",
        "a tie with the smallest key is admitted (SPEC: strict >)",
        "gap: ties must refuse",
    ),
    Mutant(
        "cb-argmax", CB,
        "torch.where(full, keys.argmin(dim=1), count.clamp(max=top_c - 1))",
        "torch.where(full, keys.argmax(dim=1), count.clamp(max=top_c - 1))",
        "a full buffer replaces the largest key instead of the smallest",
        "gap: replacement goes to the first argmin",
    ),
    Mutant(
        "cb-full-off-by-one", CB,
        "full = count >= top_c",
        "full = count > top_c",
        "the buffer counts as full only past topC",
        "gap: count <= topC, and a full buffer compares priorities",
    ),
    Mutant(
        "cb-fill-slot", CB,
        "torch.where(full, keys.argmin(dim=1), count.clamp(max=top_c - 1))",
        "torch.where(full, keys.argmin(dim=1), count.clamp(max=0))",
        "while filling, every offer goes to slot 0",
        "gap: filling takes slot = count",
    ),
    Mutant(
        "cb-refused-key", CB,
        "new_key = torch.where(admitted, nu.to(keys.dtype), key_at_slot)",
        "new_key = torch.where(admitted, nu.to(keys.dtype), nu.to(keys.dtype))",
        "a refused offer still writes its priority into the key",
        "gap: a refused offer leaves the keys alone",
    ),
    Mutant(
        "cb-draw-direction", CB,
        "admitted = admitted | (uniform(seed, offers, stream) < critical_test)",
        "admitted = admitted | (uniform(seed, offers, stream) > critical_test)",
        "critical_test admits with probability 1 - q",
        "gap: the draw admits with probability q",
    ),
    Mutant(
        "cb-offers-counter", CB,
        "offers=offers + 1,",
        "offers=offers + (~full).to(torch.int64),",
        "the offer counter (the draw's stream position) stops once full",
        "gap: offers counts every offer",
    ),
    Mutant(
        "cb-accepted-counter", CB,
        "accepted=_tree.rows(state.accepted, moved) + admitted,",
        "accepted=_tree.rows(state.accepted, moved) + ~full,",
        "accepted counts fills only, not replacements",
        "gap: accepted counts every admission",
    ),
    Mutant(
        "cb-count-nonfinite", CB,
        "filled = (count + admitted).clamp(max=top_c)",
        "filled = (count + ~full).clamp(max=top_c)",
        "a refused (non-finite) offer still fills a slot",
        "gap: a non-finite offer to a filling buffer must not count as a filled slot",
    ),
    # ------------------------------------------------------------------ critical_buffer: write, sums, aggregate, decay
    Mutant(
        "cb-refused-overwrites", SLOTS,
        "written = _put(buf, s, torch.where(adm, stored, here), donate)",
        "written = _put(buf, s, stored, donate)",
        "a refused offer overwrites the slot",
        "gap: refused offers leave the slots untouched (no mixing)",
    ),
    Mutant(
        "cb-host-refused-overwrites", SLOTS,
        "value = stored if adm is None else torch.where(adm, stored, here)",
        "value = stored",
        "with the slot read on the host, a refused element overwrites the slot",
        "gap: refused offers leave the slots untouched (no mixing)",
    ),
    Mutant(
        "cb-host-refused-written", SLOTS,
        "            if whole and not bool(adm):",
        "            if False:",
        "an eager host step writes a refused offer as if admitted",
        "gap: refused offers leave the slots untouched (no mixing)",
    ),
    Mutant(
        "cb-sink-ignored", SLOTS,
        "index = (torch.where(adm, s, top_c), torch.arange(rows.shape[1], device=buf.device))",
        "index = (s.expand(rows.shape[1]), torch.arange(rows.shape[1], device=buf.device))",
        "with a sink row (a flat stepper's leaf), a refused element overwrites the slot",
        "gap: the sink row takes refused elements",
    ),
    Mutant(
        "cb-running-sum-refused", SLOTS,
        "        change = torch.where(adm, change, 0)\n",
        "        pass\n",
        "a refused offer still changes the running buf_sum",
        "gap: buf_sum is the sum of the filled slots",
    ),
    Mutant(
        "cb-running-sum-keeps-old", SLOTS,
        "    change = stored.to(total.dtype) - old\n",
        "    change = stored.to(total.dtype)\n",
        "the replaced slot's value is not taken out of the running buf_sum",
        "gap: buf_sum is the sum of the filled slots",
    ),
    Mutant(
        "cb-slot-sum-unfilled", SLOTS,
        "        total = total + torch.where(filled > j, buf[j].to(dtype), 0)",
        "        total = total + torch.where(filled >= j, buf[j].to(dtype), 0)",
        "buf_sum also sums the first unfilled slot",
        "gap: unfilled slots are never read",
    ),
    Mutant(
        "cb-mean-divisor", CB,
        "M.per_leaf(1.0 / (count + 1), xs)",
        "M.per_leaf(1.0 / count.clamp(min=1), xs)",
        "aggr='mean' divides by count instead of count + 1",
        "gap: mean form is (x + kappa*buf_sum)/(count + 1)",
    ),
    Mutant(
        "cb-mean-of-buffer", CB,
        "weight = M.per_leaf(kappa / count.clamp(min=1), sums, operand=True)",
        "weight = M.per_leaf(kappa / (count + 1), sums, operand=True)",
        "mean(buffer) divides buf_sum by count + 1",
        "gap: mean(buffer) = buf_sum / count",
    ),
    Mutant(
        "cb-buffer-form-seed", CB,
        "    return [xs[k] if e else next(scaled) for k, e in enumerate(on_host)]",
        "    return M.scale(sums, weight)",
        "aggr='buffer' on an empty buffer gives 0 instead of x",
        "gap: the seeding step's aggregate is the value itself",
    ),
    Mutant(
        "cb-no-decay", CB,
        "keys = _tree.put_rows(state.keys, moved, _tree.rows(state.keys, moved) * factor)",
        "keys = _tree.put_rows(state.keys, moved, _tree.rows(state.keys, moved))",
        "keys never decay",
        "gap: keys *= decay after every step",
    ),
    Mutant(
        "cb-decay-all-rows", CB,
        "keys = _tree.put_rows(state.keys, moved, _tree.rows(state.keys, moved) * factor)",
        "keys = state.keys * factor",
        "decay also moves the rows of tensors without a gradient (unsynced)",
        "gap: a row the step did not move keeps its keys",
    ),
    # ------------------------------------------------------------------ _critical: the shared rule shape
    Mutant(
        "crit-aggregate-after-write", CRIT,
        "        a = cb.aggregate(crit, x, idx, h[\"kappa\"], h[\"aggr\"])\n"
        "        crit = cb.write(crit, x, idx, decision, ctx.donate)\n",
        "        crit = cb.write(crit, x, idx, decision, ctx.donate)\n"
        "        a = cb.aggregate(crit, x, idx, h[\"kappa\"], h[\"aggr\"])\n",
        "the aggregate sees this step's value already written",
        "gap: the aggregate is computed from the buffer before the offer",
    ),
    Mutant(
        "crit-priority-of-input", CRIT,
        "norms = cb.tensor_norms(crit, grads, ctx.segments)",
        "norms = cb.tensor_norms(crit, self._buffer_input(params, grads, self._base_hyper(h)), ctx.segments)",
        "priority from the buffer input (SGD_C: g + weight_decay*p) instead of the raw gradient",
        "gap: the priority is always the raw gradient's norm",
    ),
    Mutant(
        "crit-no-rule-decay", CRIT,
        "return new_params, CriticalState(state.base, cb.decay(crit, idx, h[\"decay\"]))",
        "return new_params, CriticalState(state.base, crit)",
        "the rules never decay keys",
        "gap: keys decay after the parameter update",
    ),
    # ------------------------------------------------------------------ rules
    Mutant(
        "sgdc-double-wd", "memopt_func/sgd_c.py",
        'return {**hb, "weight_decay": 0.0}',
        "return hb",
        "SGD_C applies weight decay twice (buffer input and base step)",
        "gap: SGD_C's d = g + wd*p is buffered once",
    ),
    Mutant(
        "cm-momentum-on-seed", "memopt_func/adam_cm.py",
        "m = [M.zero_where(c, x) for c, x in zip(seeding,",
        "m = [x for c, x in zip(seeding,",
        "Adam_CM's seeding step updates m",
        "gap: the seeding step keeps m = 0 (reference behaviour)",
    ),
    Mutant(
        "cm-offers-aggregate", "memopt_func/adam_cm.py",
        "crit = cb.write(crit, offered, idx, decision, inplace)",
        "crit = cb.write(crit, ma, idx, decision, inplace)",
        "Adam_CM offers the aggregated momentum instead of the plain one",
        "gap: the offered value is the plain momentum m",
    ),
    Mutant(
        "cm-v-of-m", "memopt_func/adam_cm.py",
        "v = M.ema_sq(_tree.take(base.exp_avg_sq, idx), ma, b2, inplace)",
        "v = M.ema_sq(_tree.take(base.exp_avg_sq, idx), m, b2, inplace)",
        "Adam_CM's second moment of m instead of the aggregate ma",
        "gap: v tracks the aggregated momentum",
    ),
    Mutant(
        "adam-wd-sign", "memopt_func/adam.py",
        "grads = M.axpy(grads, wd, params)",
        "grads = M.axpy(grads, -wd, params)",
        "Adam's coupled L2 with the wrong sign",
        "gap: g + weight_decay*p",
    ),
    Mutant(
        "adam-amsgrad-ignored", "memopt_func/adam.py",
        'denom = M.adam_denominator(vmax if h["amsgrad"] else v, b2, t, eps)',
        "denom = M.adam_denominator(v, b2, t, eps)",
        "amsgrad keeps vmax but never uses it",
        "gap: amsgrad divides by sqrt(vmax)",
    ),
    Mutant(
        "rms-centered-sign", "memopt_func/rmsprop.py",
        "sq, ga, ga, value=-1)",
        "sq, ga, ga, value=1)",
        "centered RMSprop adds ga^2 instead of subtracting",
        "gap: centered avg = sqrt(sq - ga^2) + eps",
    ),
    Mutant(
        "rms-momentum-sign", "memopt_func/rmsprop.py",
        "new_params = M.axpy(params, -lr, mb, inplace)",
        "new_params = M.axpy(params, lr, mb, inplace)",
        "RMSprop with momentum ascends",
        "gap: p -= lr * mb",
    ),
    Mutant(
        "sgd-dampening", "memopt_func/sgd.py",
        "momentum, inplace), 1 - dampening, d, inplace=True)",
        "momentum, inplace), dampening, d, inplace=True)",
        "SGD momentum weighs d by dampening instead of 1 - dampening",
        "gap: mb = momentum*mb + (1 - dampening)*d",
    ),
    Mutant(
        "sgd-first-buffer", "memopt_func/sgd.py",
        "mb = M.where(M.per_leaf(first), d, continued, inplace)",
        "mb = continued",
        "SGD's first momentum buffer is dampened (torch.optim clones d)",
        "gap: the first step sets mb = d",
    ),
    Mutant(
        "sgd-nesterov-ignored", "memopt_func/sgd.py",
        'd = M.axpy(d, momentum, mb) if h["nesterov"] else mb',
        "d = mb",
        "nesterov=True behaves as plain momentum",
        "gap: Nesterov steps along d + momentum*mb",
    ),
    Mutant(
        "adx-bias-beta", "memopt_func/ademamix.py",
        "u = M.scale(m1, M.per_leaf(1 / (1 - M.power(b1, t)), grads, operand=True))",
        "u = M.scale(m1, M.per_leaf(1 / (1 - M.power(b2, t)), grads, operand=True))",
        "AdEMAMix corrects m1 with b2 instead of b1",
        "gap: m1 / (1 - b1**t)",
    ),
    Mutant(
        "adx-wd-sign", "memopt_func/ademamix.py",
        "u = M.axpy(u, wd, params, inplace=True)",
        "u = M.axpy(u, -wd, params, inplace=True)",
        "AdEMAMix's weight decay with the wrong sign",
        "gap: u + weight_decay*p",
    ),
    # ------------------------------------------------------------------ _math
    Mutant(
        "math-ema-beta", MATH,
        '"lerp_" if inplace else "lerp", ms, xs, 1 - beta)',
        '"lerp_" if inplace else "lerp", ms, xs, 1 - beta if inplace else beta)',

        "EMA with beta and 1 - beta swapped (pure path)",
        "gap: m = beta*m + (1-beta)*x",
    ),
    Mutant(
        "math-ema-beta-inplace", MATH,
        '"lerp_" if inplace else "lerp", ms, xs, 1 - beta)',
        '"lerp_" if inplace else "lerp", ms, xs, beta if inplace else 1 - beta)',

        "EMA with beta and 1 - beta swapped (donated path: Stepper, drop-ins)",
        "gap: donated and pure steps compute the same numbers",
    ),
    Mutant(
        "math-ema-sq-weight", MATH,
        "out, xs, xs, value=1 - beta)",
        "out, xs, xs, value=beta)",
        "second moment weighs x*x by beta",
        "gap: v = beta*v + (1-beta)*x*x",
    ),
    Mutant(
        "math-bc2-sqrt", MATH,
        "bc2_sqrt = torch.sqrt(1 - power(b2, t))",
        "bc2_sqrt = 1 - power(b2, t)",
        "second-moment bias correction without the square root",
        "gap: denom = sqrt(v)/sqrt(1 - b2**t) + eps",
    ),
    Mutant(
        "math-no-eps", MATH,
        "add_scalar_(d, eps)",
        "add_scalar_(d, 0.0 * eps)",
        "eps dropped from the Adam denominator",
        "gap: denom adds eps",
    ),
    Mutant(
        "math-no-bc1", MATH,
        "per_leaf(-(lr / (1 - power(b1, t))), num, operand=True)",
        "per_leaf(-(lr + 0 * t), num, operand=True)",
        "first-moment bias correction dropped",
        "gap: step size lr / (1 - b1**t)",
    ),
    Mutant(
        "math-decoupled-sign", MATH,
        "return scale(params, 1 - lr * weight_decay, inplace)",
        "return scale(params, 1 + lr * weight_decay, inplace)",
        "AdamW decay grows the parameters",
        "gap: p *= 1 - lr*weight_decay",
    ),
    Mutant(
        "math-amsgrad-min", MATH,
        '"maximum_" if inplace else "maximum", vmax, vs)',
        '"minimum_" if inplace else "minimum", vmax, vs)',
        "amsgrad keeps the running minimum",
        "gap: vmax = max(vmax, v)",
    ),
    Mutant(
        "math-per-leaf-barrier", MATH,
        "vec = torch.cumsum(vec.unsqueeze(0), dim=0).squeeze(0)",
        "vec = vec",
        "per_leaf without its scan (a fusion barrier for torch.compile)",
        "equivalent: a cumsum over one element is the identity; only Inductor's fusion changes",
    ),
    # ------------------------------------------------------------------ compiled Stepper
    Mutant(
        "st-no-cpu-codegen", STEPPER,
        '        inductor = {"emulate_precision_casts": True, **codegen}\n',
        '        inductor = {"emulate_precision_casts": True}\n',
        "steppers compile without cpu_codegen's options (the 512-bit compiler loops on AVX-512 CPUs)",
        "gap: on such a CPU the flag must reach the C++ compiler (a speed fix that changes no number)",
        tests="codegen",
    ),
    Mutant(
        "st-no-segments", STEPPER,
        "donate=True, segments=self._segments, **hyper",
        "donate=True, segments=None, **hyper",
        "the flat Stepper drops the segment runs: one norm per flat buffer",
        "gap: a flat buffer's priority is the sum of its tensors' norms",
        tests="stepper",
    ),
    Mutant(
        "st-no-state-copy-back", STEPPER,
        "            for dst, src in copies:\n                dst.copy_(src)\n",
        "            for dst, src in copies:\n                pass\n",
        "state tensors that the step returns fresh (keys, counters) are not copied back",
        "gap: every state tensor persists across steps",
        tests="stepper",
    ),
    Mutant(
        "st-no-param-copy-back", STEPPER,
        "            torch._foreach_copy_([params[i] for i in moved], [new_params[i] for i in moved])\n",
        "            pass\n",
        "parameters that the step returns fresh are not copied back",
        "equivalent: with donate=True every rule writes the flat parameters in place, so no fresh parameter is returned",
        tests="stepper",
    ),
    Mutant(
        "st-no-sink", STEPPER,
        "                state = cb.map_buffers(state, cb.with_sink)\n",
        "                pass\n",
        "the flat stepper's buffers carry no sink row",
        "equivalent: write() then reads the slot row and writes it back where refused; same numbers, one leaf-sized temporary more",
        tests="stepper",
    ),
    Mutant(
        "st-no-host-scalars", STEPPER,
        "    return torch._dynamo.config.patch(capture_scalar_outputs=True)",
        "    return contextlib.nullcontext()",
        "a compiled CPU step does not trace the slot index read, so its rows are gathered and written back",
        "gap: same numbers, but the slot write is the accelerator's (a gathered row staged per tensor); the host form is asserted",
        tests="stepper",
    ),
    Mutant(
        "st-hyper-not-set", "memopt_func/compiled/hyper_tensors.py",
        "target.copy_(value) if isinstance(value, Tensor) else target.fill_(value)",
        "None",
        "per-step hyperparameters (lr schedules) are ignored after the first step",
        "gap: stepper.step(lr=...) changes the persistent lr",
        tests="stepper",
    ),
    Mutant(
        "st-per-tensor-when-synced", STEPPER,
        'if "synced" in rule.hyper and not rule.hyper["synced"] and rule.hyper["kappa"] != 0 and rule.hyper["topC"] > 0:',
        'if "synced" in rule.hyper and rule.hyper["kappa"] != 0 and rule.hyper["topC"] > 0:',
        "synced critical rules never take the flat layout",
        "gap: a synced rule steps flat by default (the flat layout is what is tested)",
        tests="stepper",
    ),
    Mutant(
        "st-hyper-always-same", "memopt_func/compiled/hyper_tensors.py",
        "    return type(value) in (int, float) and type(held) is type(value) and held == value",
        "    return True",
        "set_hyper takes every number for the one its tensor already holds, so it never writes",
        "gap: a changed lr reaches the step (the skip is for unchanged numbers only)",
        tests="stepper",
    ),
    Mutant(
        "st-grads-never-checked", STEPPER,
        "        return all(p is leaf and p.grad is view for p, leaf, view in zip(params, self._leaves, self._grad_views))",
        "        return True",
        "a flat compiled group never re-checks its gradients, whatever .grad holds",
        "gap: a gradient set by hand after the first step is checked (a sparse one is refused, nothing moves)",
        tests="stepper",
    ),
    Mutant(
        "cb-host-read-one-row", CB,
        "        row=dict(zip(idx, rows)),",
        "        row=dict.fromkeys(idx, 0),",
        "the host slot read is shared by every leaf, so unsynced leaves write the first leaf's slot",
        "gap: each unsynced leaf writes its own chosen slot",
    ),
    Mutant(
        "opt-recipe-layout-unchecked", "memopt_func/optim.py",
        "            self._prepare_untraced()",
        "            pass",
        "under torch.compile(opt.step) a changed topC is stepped without a word",
        "gap: the recipe refuses a layout change as eager does",
        tests="recipe",
    ),
    Mutant(
        "opt-recipe-flat-layout-unknown", "memopt_func/compiled/optim.py",
        "            opt.groups.record_layout(group, rule)",
        "            pass",
        "flat steppers do not record the layout their first step made, so a changed topC goes unchecked",
        "gap: the recipe (and a compiled drop-in) refuses a layout change as eager does",
        tests="recipe",
    ),
    Mutant(
        "opt-recipe-traced-per-tensor", "memopt_func/optim.py",
        "        return fits and (torch.compiler.is_compiling() or _compile_callback() is not None)",
        "        return False",
        "under torch.compile(opt.step) the drop-in is traced tensor by tensor (minutes of compiling)",
        "gap: the recipe hands the step to flat steppers",
        tests="recipe",
    ),
    Mutant(
        "cb-eager-refused-written", SLOTS,
        "        if not admitted[decision.at[i]]:",
        "        if False:",
        "the eager in-place write (slot and flag read on the host) writes a refused offer",
        "gap: a refused offer moves nothing",
    ),
    Mutant(
        "cb-eager-old-kept", SLOTS,
        "        torch._foreach_sub_(change, old)\n",
        "        pass\n",
        "the eager in-place write adds the offered value to buf_sum without taking out the one it replaces",
        "gap: buf_sum stays the sum of the filled slots",
    ),
    Mutant(
        "cb-device-buffer-form-seed", CB,
        "        return M.where(M.per_leaf(empty), xs, M.scale(sums, weight))",
        "        return M.scale(sums, weight)",
        "aggr='buffer' off the host gives 0 instead of x on an empty buffer",
        "gap: the device form equals the host form (and the SPEC) on the seeding step",
    ),
    Mutant(
        "cm-host-seeding-kept", "memopt_func/adam_cm.py",
        "            m = [M.zero_where(torch.ones((), dtype=torch.bool), x) if s else x for s, x in zip(on_host, m)]",
        "            m = list(m)",
        "Adam_CM read on the host keeps m on the seeding step instead of leaving it at 0",
        "gap: the seeding step leaves m at 0 (the reference's first step)",
    ),
    Mutant(
        "sgd-host-first-continues", "memopt_func/sgd.py",
        "            mb = [(c.copy_(x) if inplace else x.clone()) if f else c for f, x, c in zip(on_host, d, continued)]",
        "            mb = list(continued)",
        "SGD's momentum buffer, read on the host, is not started as d on a leaf's first step",
        "gap: torch.optim.SGD starts the buffer as the first (dampening-free) d",
    ),
    Mutant(
        "math-operand-cast-narrow", MATH,
        "            vec = vec.to(torch.float32)",
        "            vec = vec.to(torch.bfloat16)",
        "per-leaf scalars cast once to bfloat16 instead of float32 before the element-wise ops",
        "gap: the one cast is the cast each op would make (float32), so the numbers do not move",
    ),
    Mutant(
        "rule-slices-advance-per-slice", "memopt_func/_parts.py",
        "        views = _tree.map_leaf_entries(state, [i], cut)",
        "        views = _tree.map_leaf_entries(first or state, [i], cut)",
        "a sliced leaf's slices see the previous slice's counters, so the step counter moves once per slice",
        "gap: a leaf's counters move once per step however it is sliced",
        tests="chunked",
    ),
    Mutant(
        "rule-scratch-kept-as-state", "memopt_func/_parts.py",
        "    held = lambda t: isinstance(t, Tensor) and id(t) not in given and scratch.holds(t)  # noqa: E731",
        "    held = lambda t: False  # noqa: E731",
        "a temporary that a rule keeps as state stays in the scratch, which the next run overwrites",
        "gap: what a step returns never lies in the scratch",
        tests="chunked",
    ),
    Mutant(
        "opt-state-never-rechecked", "memopt_func/groups.py",
        "        return len(now) == len(then) and now[:n] == then[:n] and all(a is b for a, b in zip(now[n:], then[n:]))",
        "        return True",
        "after its first steps a drop-in never checks its state again, whatever is put into it",
        "gap: a state tensor replaced by hand (or a reshaped parameter) is checked and refused",
        tests="chunked",
    ),
    # ------------------------------------------------------------------ storage: random streams
    Mutant(
        "st-stream-field-shared", "memopt_func/schema.py",
        '    "buf": 7,',
        '    "buf": 0,',
        "the critical slots draw exp_avg's stream (a field id that is a position would move like this)",
        "gap: every field has a stream of its own, pinned",
        tests="checkpoint",
    ),
    Mutant(
        "st-stream-renumbered", "memopt_func/schema.py",
        '    "exp_avg_sq": 4,',
        '    "exp_avg_sq": 9,',
        "a moment's stream id moves (as a new field inserted before it in a list would move it)",
        "gap: a resume across versions draws the same bits; the pinned draws change",
        tests="checkpoint",
    ),
    Mutant(
        "st-stream-no-step", CODES,
        "return (step.to(torch.int64) * 0x9E3779B1 + (position * 64",
        "return (step.to(torch.int64) * 0 + (position * 64",
        "every step draws the same bits",
        "gap: two steps never share a stream",
        tests="checkpoint",
    ),
    Mutant(
        "st-stream-no-position", CODES,
        "(position * 64 + STREAM_ID[field])",
        "(0 * 64 + STREAM_ID[field])",
        "every tensor of a step draws the same bits",
        "gap: two tensors never share a stream",
        tests="checkpoint",
    ),
    # ------------------------------------------------------------------ storage: rounding and codes
    Mutant(
        "st-round-half-range", CODES,
        "    r = (u * float(2**k)).to(torch.int32)",
        "    r = (u * float(2 ** (k - 1))).to(torch.int32)",
        "stochastic rounding to bf16/fp16 adds half the random range (biased towards zero)",
        "gap: stochastic rounding is unbiased within a binade",
        tests="checkpoint",
    ),
    Mutant(
        "st-round-float32-bits", CODES,
        "        r = (u * 2.0**29).to(torch.int64)",
        "        r = (u * 2.0**28).to(torch.int64)",
        "stochastic rounding from float64 to float32 adds half the random range",
        "gap: stochastic rounding is unbiased within a binade",
        tests="checkpoint",
    ),
    Mutant(
        "st-code-square-power", CODES,
        'POWER = {"signed": 2.0, "square": 4.0}',
        'POWER = {"signed": 2.0, "square": 2.0}',
        "second moments decoded with the signed code's power",
        "gap: 8-bit checkpoints decode to the values they encoded (golden int8 resume)",
        tests="checkpoint",
    ),
    Mutant(
        "st-code-nearest", CODES,
        "        up = p > 0.5",
        "        up = p > 0.75",
        "to-nearest 8-bit codes round down up to three quarters of the way",
        "gap: a value to nearest takes the nearer of its two bracketing codes",
        tests="checkpoint",
    ),
    Mutant(
        "st-code-signed-absmax", CODES,
        "    absmax = xb.abs().amax(dim=-1)",
        "    absmax = xb.amax(dim=-1)",
        "a block's scale is its largest value, not its largest magnitude",
        "gap: every stored value is one of the two codes that bracket it",
        tests="checkpoint",
    ),
    Mutant(
        "st-code-zero-guard", CODES,
        "        q = torch.where(xb > 0, q.clamp(min=1), q)",
        "        q = torch.where(xb > 0, q, q)",
        "a tiny non-zero second moment may be stored as 0",
        "gap: a non-zero second moment never becomes 0 (its step would divide by eps)",
        tests="checkpoint",
    ),
    # ------------------------------------------------------------------ sharding
    Mutant(
        "sh-norms-not-squared", SHARDING,
        "            part = part * part",
        "            part = part.abs()",
        "shards' norms are added, not their squares",
        "gap: a tensor's priority is sqrt(sum over shards of the local sum of squares)",
        tests="sharding",
    ),
    Mutant(
        "sh-max-not-sum", SHARDING,
        "dist.all_reduce(part, op=dist.ReduceOp.SUM, group=group)",
        "dist.all_reduce(part, op=dist.ReduceOp.MAX, group=group)",
        "the largest shard's sum of squares stands for the tensor's",
        "gap: every shard counts in the full norm",
        tests="sharding",
    ),
    Mutant(
        "sh-replicated-reduced", SHARDING,
        "            if not dims:\n                continue",
        "            if not dims:\n                dims = (0,)",
        "a replicated DTensor's norm is all-reduced as if sharded (counted once per rank)",
        "gap: replicated placements need no collective",
        tests="sharding",
    ),
    # ------------------------------------------------------------------ migrate
    Mutant(
        "mig-sgd-step-zero", MIGRATE,
        "            count = float(slots[j][1]) if j in slots else 1.0",
        "            count = 0.0",
        "SGD_C's step, which the published SGD_C does not keep, starts at 0 (a first step: momentum restarts)",
        "gap: a parameter with saved state has stepped",
        tests="migrate",
    ),
    Mutant(
        "mig-buf-sum-all-slots", MIGRATE,
        "cb.slot_sum(buf, torch.tensor(count, device=buf.device), top_c, torch.float64)",
        "cb.slot_sum(buf, torch.tensor(top_c, device=buf.device), top_c, torch.float64)",
        "buf_sum counts every slot, filled or not",
        "gap: unfilled slots are never read",
        tests="migrate",
    ),
    # ------------------------------------------------------------------ state_dict load path
    Mutant(
        "ck-maximize-required", CHECKPOINT,
        '    1: ("maximize", "foreach", "state_dtype", "rounding", "param_rounding", "seed"),',
        '    1: ("foreach", "state_dtype", "rounding", "param_rounding", "seed"),',
        "a group without maximize (format 0, or PyTorch's older-state_dict test) is refused",
        "gap: the format-0 corpus and torch's test load",
        tests="checkpoint",
    ),
    Mutant(
        "ck-nonfinite-not-filled", CHECKPOINT,
        '    1: ("critical_nonfinite",),',
        "    1: (),",
        "a format-0 entry without critical_nonfinite is refused",
        "gap: entries a later format added start at zero",
        tests="checkpoint",
    ),
    Mutant(
        "ck-defaults-win", CHECKPOINT,
        "    out = {**{n: defaults[n] for n in names if n in _OPTIONAL_GROUP_KEYS and n not in group}, **group}",
        "    out = {**group, **{n: defaults[n] for n in names if n in _OPTIONAL_GROUP_KEYS}}",
        "the optimizer's defaults replace the saved values of the later-added hyperparameters (seed, ...)",
        "gap: a load puts the saved hyperparameters back",
        tests="checkpoint",
    ),
    Mutant(
        "ck-newer-format-read", CHECKPOINT,
        "    if fmt > FORMAT:",
        "    if fmt > FORMAT + 1:",
        "a state_dict of the next format is read as if it were this one",
        "gap: a newer format is refused, naming both",
        tests="checkpoint",
    ),
    Mutant(
        "ck-other-rule-loads", CHECKPOINT,
        "    if theirs is not None and theirs != rule_name:",
        "    if theirs is not None and theirs != rule_name and False:",
        "another rule's state_dict (same entry names) loads",
        "gap: another optimizer's state is refused, naming both",
        tests="checkpoint",
    ),
    Mutant(
        "opt-load-keeps-saved-dtype", OPTIM,
        "                self.state[p] = {k: _entry(v, want.get(k), p.device) for k, v in entry.items()}",
        "                self.state[p] = {k: _entry(v, None, p.device) for k, v in entry.items()}",
        "loaded entries keep the saved dtype and device (a float64 checkpoint into float32 parameters)",
        "gap: each entry takes the dtype a fresh state has",
        tests="checkpoint",
    ),
    Mutant(
        "stepper-load-skips-first", STEPPER,
        "        for dst, src in pairs:\n            dst.copy_(src)",
        "        for dst, src in pairs[1:]:\n            dst.copy_(src)",
        "a Stepper's load leaves its first entry as it was",
        "gap: every entry is loaded",
        tests="checkpoint",
    ),
    # ------------------------------------------------------------------ grouped eager steps
    Mutant(
        "gr-draw-flat-index", "memopt_func/_codes.py",
        "    counter = torch.arange(n, device=part.device, dtype=torch.int64) + base.repeat_interleave(sizes, output_size=n)\n",
        "    counter = torch.arange(n, device=part.device, dtype=torch.int64)\n",
        "a flat group's stochastic rounding counts elements across the chunk, not within each tensor",
        "gap: SPEC 'Random streams': any layout draws the same bits for the same element",
        tests="grouped",
    ),
    Mutant(
        "gr-layout-by-size", STEPPER,
        "            self.layout = FlatLayout(leaves, by_size=not grouped)\n",
        "            self.layout = FlatLayout(leaves)\n",
        "a grouped step orders its tensors by size, so the synced priority sums the norms in another order",
        "gap: the grouped step must give the per-tensor step's bits",
        tests="grouped",
    ),
    Mutant(
        "gr-flags-first-tensor", CB,
        "            out.append(finite[t : t + sizes.shape[0]].repeat_interleave(sizes, output_size=_numel(runs)))\n",
        "            out.append(finite[t].expand(_numel(runs)))\n",
        "a flat group takes its first tensor's finiteness for every element",
        "gap: a tensor with a non-finite gradient is left out of the slot write, the others are not",
        tests="grouped",
    ),
    Mutant(
        "gr-stale-stepper", "memopt_func/compiled/optim.py",
        "        if same and stepper.rule is rule and stepper.holds_params() and self._entries_kept(index):",
        "        if same and stepper.rule is rule and self._entries_kept(index):",
        "a parameter given new storage keeps being stepped in the old flat buffer",
        "gap: param.data re-pointed (module.to) must be stepped where it now lives",
        tests="grouped",
    ),

]
