"""Mutation testing: small deliberate bugs, each of which the fast tests must catch.

    python -m tools.dev.mutants              # every mutant; exit 1 if any survives
    python -m tools.dev.mutants --list       # the list, without running
    python -m tools.dev.mutants --only NAME [--only NAME2 ...]

Each mutant replaces one exact piece of text in one file of a temporary copy of
the repository (the tracked files and the built extension), then runs the tests
named for it there, stopping at the first failure. A mutant is killed when a test
fails, survives when they all pass: a survivor is a hole in the tests. The copy
shadows the installed package, since Python puts the working directory first.

Equivalent mutants do not belong on the list. (Rounding crop offsets down instead of to
nearest was one while every crop position was an exact k/32; the 227 crops' centre, 14.5,
makes it a real mutant.)
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    old: str          # must occur exactly once in the file
    new: str
    tests: tuple      # pytest node ids or files, run with -x


M, T, P, S = "tests/test_model.py", "tests/test_train.py", "tests/test_pipeline.py", "tests/test_make_shards.py"
F, E = "tests/test_figures.py", "tests/test_table2.py"
MUTANTS = (
    # the model
    Mutant("LRN before ReLU", "model/alexnet.py",
           "    x = F.relu(conv(x), inplace=True)\n    if name in lrn_after:\n",
           "    x = conv(x)\n    if name in lrn_after:\n        x = F.relu(lrn(x))\n    else:\n        x = F.relu(x)\n"
           "    if False:\n",
           (f"{M}::test_forward_pass_is_the_papers_layer_order",)),
    Mutant("no pool after conv5", "model/alexnet.py", 'POOL_AFTER = ("conv1", "conv2", "conv5")',
           'POOL_AFTER = ("conv1", "conv2")', (M,)),
    Mutant("dropout after fc7 dropped", "model/alexnet.py",
           "        return F.dropout(F.relu(self.fc7(x), inplace=True), p, self.training)",
           "        return F.relu(self.fc7(x), inplace=True)", (f"{M}::test_forward_pass_is_the_papers_layer_order",)),
    Mutant("dropout also in eval mode", "model/alexnet.py",
           "        x = F.dropout(F.relu(self.fc6(x), inplace=True), p, self.training)",
           "        x = F.dropout(F.relu(self.fc6(x), inplace=True), p, True)",
           (f"{M}::test_forward_pass_is_the_papers_layer_order",)),
    Mutant("LRN across the halves", "model/alexnet.py",
           "        return self.lrn(x.reshape(n * 2, c // 2, h, w)).reshape(n, c, h, w)", "        return self.lrn(x)",
           (f"{M}::test_forward_pass_is_the_papers_layer_order",)),
    Mutant("LRN printed formula by default", "model/alexnet.py",
           'lrn_convention: str = "alpha/n"  #', 'lrn_convention: str = "alpha"  #',
           (f"{M}::test_lrn_follows_the_papers_formula",)),
    Mutant("paper init without biases of 1", "model/alexnet.py",
           'INIT_BIAS = {"paper": 1.0,', 'INIT_BIAS = {"paper": 0.0,', (f"{M}::test_paper_init",)),
    Mutant("released init: conv4 at the paper's 0.01", "model/alexnet.py", '"conv4": 0.03, "conv5": 0.03, "conv6"',
           '"conv4": 0.01, "conv5": 0.03, "conv6"', (f"{M}::test_the_authors_released_init",)),
    Mutant("the paper's LRN k at Caffe's 1", "model/recipes.py", "lrn_k: float = _f(2.0,", "lrn_k: float = _f(1.0,",
           (f"{M}::test_every_recipe_value_reaches_the_run",)),
    Mutant("Caffe's fc6/fc7 at 0.01", "model/alexnet.py", "CAFFE_BIAS, CAFFE_FC_STD = 0.1, 0.005",
           "CAFFE_BIAS, CAFFE_FC_STD = 0.1, 0.01", (f"{M}::test_every_recipe_value_reaches_the_run",)),
    Mutant("four lr divisions", "model/recipes.py", "max_lr_divisions: int = _f(3,", "max_lr_divisions: int = _f(4,",
           (f"{M}::test_every_recipe_value_reaches_the_run",)),
    Mutant("lr not kept per image", "model/recipes.py",
           "return replace(recipe, lr=recipe.lr * recipe.batch_size / recipe.lr_batch, lr_batch=recipe.batch_size)",
           "return replace(recipe, lr_batch=recipe.batch_size)",
           (f"{M}::test_the_step_per_image_is_kept_across_batch_sizes",)),
    # the trainer
    Mutant("bias lr not doubled", "model/optim.py", '{"params": biases, "lr_mult": recipe.bias_lr_mult,',
           '{"params": biases, "lr_mult": 1.0,', (f"{M}::test_trainer_step_is_the_papers_update_rule",)),
    Mutant("weight decay on biases", "model/optim.py",
           '"weight_decay": recipe.weight_decay if recipe.bias_decay else 0.0}',
           '"weight_decay": recipe.weight_decay}', (f"{M}::test_trainer_step_is_the_papers_update_rule",)),
    Mutant("momentum 0.95", "model/optim.py", "lr=recipe.lr,\n                           momentum=recipe.momentum)",
           "lr=recipe.lr,\n                           momentum=0.95)", (f"{M}::test_trainer_step_is_the_papers_update_rule",)),
    Mutant("no momentum rescale at an lr change", "model/optim.py",
           "                torch._foreach_mul_(bufs, old / new)", "                pass",
           (f"{M}::test_trainer_step_is_the_papers_update_rule",)),
    Mutant("summed loss instead of the batch mean", "model/optim.py",
           "        loss = F.cross_entropy(net(images)[:n], labels)",
           '        loss = F.cross_entropy(net(images)[:n], labels, reduction="sum")',
           (f"{M}::test_trainer_step_is_the_papers_update_rule",)),
    Mutant("plateau patience off by one", "model/optim.py", "if since >= patience and divisions < max_divisions:",
           "if since > patience and divisions < max_divisions:", (f"{M}::test_plateau_schedule",)),
    # the evaluation
    Mutant("ten crops average logits", "model/evaluation.py",
           "probs = F.softmax(model(images.flatten(0, 1)).float(), 1).view(b, n, -1).mean(1)",
           "probs = F.softmax(model(images.flatten(0, 1)).float().view(b, n, -1).mean(1), 1)",
           (f"{T}::test_evaluation_on_hand_built_logits",)),
    Mutant("top-5 is top-1", "model/evaluation.py", "top5 = probs.topk(min(5, probs.shape[1]), 1).indices",
           "top5 = probs.topk(1, 1).indices", (f"{T}::test_evaluation_on_hand_built_logits",)),
    # augmentation and pixel values
    Mutant("lighting times lambda", "pipeline/normalization.py",
           "stdevs = np.sqrt(np.maximum(np.asarray(self.eigenvalues, np.float64), 0.0))",
           "stdevs = np.asarray(self.eigenvalues, np.float64)",
           (f"{P}::test_lighting_in_loader_output_is_0_1_sqrt_lambda_along_each_eigenvector",)),
    Mutant("no 1/1.1 on lit batches", "pipeline/normalization.py",
           "return shift, divisor / (self.train_scale if lit else 1.0)", "return shift, divisor",
           (f"{P}::test_mean_only_normalization_is_the_default",)),
    Mutant("wds loader never flips", "pipeline/wds.py", "flip = bool(p.flip[j]) and cfg.flip", "flip = False",
           (f"{P}::test_train_batches_match_reference",)),
    Mutant("ten crops: two corners swapped", "pipeline/plan.py", "((0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0)",
           "((0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0)", (f"{P}::test_eval_crops_match_reference",)),
    Mutant("ranks share a sample", "pipeline/plan.py", "return rank * per, (rank + 1) * per",
           "return rank * per, (rank + 1) * per + 1", (f"{P}::test_rank_orders_are_disjoint_exactly_once_and_reshuffled",)),
    # the shard writer
    Mutant("crop box shifted one pixel", "pipeline/images.py",
           "box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)",
           "box = ((w - side) / 2 + 1, (h - side) / 2, (w + side) / 2 + 1, (h + side) / 2)",
           (f"{S}::test_resize_and_centre_crop_geometry_on_a_gradient",)),
    Mutant("EXIF orientation ignored", "pipeline/images.py", "    if img.getexif().get(ORIENTATION, 1) != 1:",
           "    if False:", (f"{S}::test_exif_orientation_and_16_bit_pngs_as_a_viewer_shows_them_in_shards_and_predict",)),
    Mutant("16-bit PNGs clipped", "pipeline/images.py", '    if img.mode.startswith("I"):', "    if False:",
           (f"{S}::test_exif_orientation_and_16_bit_pngs_as_a_viewer_shows_them_in_shards_and_predict",)),
    Mutant("file names used as keys unchanged", "tools/imagenet_source.py", "    if SAFE_KEY.fullmatch(stem):",
           "    if True:", (f"{S}::test_any_file_name_gives_keys_both_formats_take",)),
    Mutant("journal blind to the source", "tools/make_shards.py",
           '            if rec.get("plan") != plan_digests.get(name) or (self.rehash and rec.get("content") != '
           'self._content(name)):', "            if False:",
           (f"{S}::test_a_file_deleted_after_a_failed_run_is_never_mixed_in",)),
    # the GPU lines, on the CPU
    Mutant("a CUDA device without its index", "model/devices.py", '            devices[i] = f"cuda:{index}"',
           '            devices[i] = "cuda"', ("tests/test_gpu_lines.py",)),
    Mutant("a padded batch's padding in the loss", "model/optim.py", "F.cross_entropy(net(images)[:n], labels)",
           "F.cross_entropy(net(images)[-n:], labels)", ("tests/test_gpu_lines.py::test_a_padded_last_batch_gives_the_unpadded_step",)),
    # what a checkpoint, a manifest and an index claim
    Mutant("checkpoint digest over the tensors only", "model/checkpoint.py",
           "    h.update(json.dumps(_without_tensors(rest), sort_keys=True, default=repr).encode())", "",
           (f"{T}::test_a_flipped_byte_outside_the_tensors_is_refused",)),
    Mutant("evaluate counts the classes only", "model/checkpoint.py", '    if ckpt["wnids"] != wnids:', "    if False:",
           (f"{T}::test_evaluate_refuses_shards_of_other_classes_with_the_same_count",)),
    Mutant("the .idx trusted", "pipeline/dali.py", '                if member_at(data, o) != (f"{entry.key}.{ext}", n):',
           "                if False:", (f"{P}::test_a_rotated_index_label_column_is_refused",)),
    Mutant("pca.json of another shard set", "pipeline/normalization.py", "        if source != manifest_sha:",
           "        if False:", (f"{T}::test_bad_input_one_line_nothing_overwritten",)),
    # shard integrity in the loaders
    Mutant("loaders skip the sha256 check", "pipeline/loader.py",
           "        if self.verifier is not None:\n            for shard", "        if False:\n            for shard",
           (f"{P}::test_a_tampered_shard_never_reaches_the_model",)),
    Mutant("DALI fed unverified shards", "pipeline/dali.py", "        self.verified(pairs)  # DALI never sees",
           "        pass  # DALI never sees", (f"{P}::test_a_tampered_shard_never_reaches_the_model",)),
    Mutant("wds batch leaves before its shards are verified", "pipeline/wds.py",
           "            self.verified(order[k * bs:(k + 1) * bs])", "            self.verified(order[:0])",
           (f"{P}::test_a_tampered_shard_never_reaches_the_model",)),
    Mutant("parts off by one", "tools/make_shards.py", "k % self.part[1] == self.part[0] - 1",
           "k % self.part[1] == self.part[0]", (f"{S}::test_any_number_of_parts_gives_one_nodes_shards_byte_for_byte",)),
    # Table 2: ensembles and fine-tuning, the Fall 2011 release
    Mutant("val fraction rounded down", "tools/imagenet_source.py", "    count = min(math.floor(fraction * n + 0.5), n - 1)",
           "    count = min(math.floor(fraction * n), n - 1)",
           (f"{S}::test_fall11_every_image_once_and_the_val_fraction_exact_per_class",)),
    Mutant("the ensemble keeps only the last model", "model/evaluation.py", "        self.total[rows] += probs",
           "        self.total[rows] = probs", (f"{E}::test_ensemble_by_hand_right_where_every_model_is_wrong",)),
    Mutant("--init-from loads nothing", "model/checkpoint.py",
           "    load_canonical(model, state)",
           "    load_canonical(model, own)",
           (f"{E}::test_init_from_loads_every_matching_layer_and_initialises_the_rest",)),
    # the paper's figures (section 6.1)
    Mutant("colour share without the grey axis", "tools/show_filters.py",
           "    return ((w - grey) ** 2).sum(axis=(1, 2, 3))", "    return (w ** 2).sum(axis=(1, 2, 3))",
           (f"{F}::test_colour_share_by_hand",)),
    Mutant("top-5 in ascending order", "tools/show_predictions.py", "np.argsort(-p, kind=\"stable\")",
           "np.argsort(p, kind=\"stable\")", (f"{F}::test_top5_rows_by_hand",)),
    Mutant("the farthest neighbours", "tools/neighbours.py", "largest=False, sorted=True",
           "largest=True, sorted=True", (f"{F}::test_nearest_in_blocks_is_brute_force",)),
    Mutant("each block forgets the best so far", "tools/neighbours.py",
           "merged_d, merged_i = torch.cat([best_d, d], 1), torch.cat([best_i, idx], 1)",
           "merged_d, merged_i = d, idx", (f"{F}::test_nearest_in_blocks_is_brute_force",)),
    Mutant("a tar's listing kept after its mtime changed", "tools/imagenet_source.py",
           '"size": st.st_size, "mtime_ns": st.st_mtime_ns,', '"size": st.st_size,',
           (f"{S}::test_a_tar_of_tars_listing_is_read_again_only_while_the_tar_is_unchanged",)),
    Mutant("PCA: the sample covariance (n - 1)", "tools/compute_pca.py", "/ (n * n * 255 * 255) for j in range(3)]",
           "/ (n * (n - 1) * 255 * 255) for j in range(3)]",  # 1/n relative, 2.5e-8 here: the exact check's to catch
           ("tests/test_compute_pca.py::test_matches_numpy_reference",)),
    # issues 29-32: threads, listings, parts, ensembles, the GPU review, the 227 geometry
    Mutant("the trainer leaves its threads to the launcher", "model/train.py",
           "    torch.set_num_threads(threads)  # before any tensor work", "    pass  # before any tensor work",
           (f"{T}::test_the_trainer_sets_its_intra_op_threads_whatever_the_launcher_left",)),
    Mutant("a listing trusted without its tar header", "tools/imagenet_source.py",
           "        if info is None or info.size != self.size or not (info.name == member or long_name):",
           "        if info is None:", (f"{S}::test_a_wrong_listing_cache_is_refused_not_trusted",)),
    Mutant("--merge ignores the parts' listings", "tools/make_shards.py",
           'd["classes"] != first["classes"] or d.get("listing") != first.get("listing"):',
           'd["classes"] != first["classes"]:', (f"{S}::test_merge_refuses_parts_planned_from_different_listings",)),
    Mutant("an ensemble compares paths, not digests", "model/evaluate.py", '        if ckpt["digest"] in seen:',
           "        if path in seen.values():",
           ("tests/test_table2.py::test_ensemble_refuses_other_classes_or_inputs_before_any_work",)),
    Mutant("fc8 rows by index, not wnid", "model/checkpoint.py", "        rows = [(i, row_of[w]) for i, w in enumerate(wnids) if w in row_of]",
           "        rows = [(i, i) for i, w in enumerate(wnids) if w in row_of]",
           ("tests/test_table2.py::test_init_from_fc8_rows_follow_the_wnids",)),
    Mutant("DALI's batch let go at once", "pipeline/dali.py", "                        self._ring.release_after_use((out, images, labels))",
           "                        pass", ("tests/test_gpu_lines.py::test_the_dali_loader_holds_each_gpu_batch_until_the_gpu_has_read_it",)),
    Mutant("LRN left in float32 under autocast", "model/alexnet.py", "        x = lrn(x).to(x.dtype)", "        x = lrn(x)",
           ("tests/test_gpu_lines.py::test_lrn_keeps_the_convolutions_dtype_under_bf16_autocast",)),
    Mutant("momentum buffers NCHW after a resume", "model/checkpoint.py",
           "torch.empty_like(p, memory_format=torch.preserve_format\n", "torch.empty_like(p, memory_format=torch.contiguous_format\n",
           (f"{M}::test_momentum_restored_beside_channels_last_weights_is_channels_last",)),
    Mutant("conv1 padded at 227", "model/alexnet.py", "CONV1_PADDING = {224: 2, 227: 0}", "CONV1_PADDING = {224: 2, 227: 2}",
           (f"{M}::test_227_input_with_conv1_unpadded_keeps_every_shape",)),
    Mutant("227 asked, 224 cropped (webdataset loader)", "pipeline/wds.py",
           "        images, labels, side = [], [], self.loader.cfg.crop_size", "        images, labels, side = [], [], 224",
           (f"{P}::test_eval_crops_match_reference",)),
    Mutant("crop offsets rounded down", "pipeline/plan.py", "    return int(np.floor(position * (size - crop) + 0.5))",
           "    return int(np.floor(position * (size - crop)))", (f"{P}::test_eval_crops_match_reference",)),
)


def copy_repo(dst: str) -> None:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    files = [f for f in files if os.path.exists(os.path.join(REPO, f))]
    for f in files + [os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "tools", "*.so"))]:
        os.makedirs(os.path.join(dst, os.path.dirname(f)), exist_ok=True)
        shutil.copy2(os.path.join(REPO, f), os.path.join(dst, f))


def run_tests(root: str, tests: tuple) -> int:
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    return subprocess.run(cmd, cwd=root, capture_output=True, text=True).returncode


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", action="append", default=[], help="run only this mutant (by name); repeatable")
    p.add_argument("--list", action="store_true", help="list the mutants and stop")
    a = p.parse_args(argv)
    chosen = [m for m in MUTANTS if not a.only or m.name in a.only]
    if a.only and len(chosen) != len(set(a.only)):
        p.error(f"unknown mutant among {a.only}; --list shows them")
    if a.list:
        for m in chosen:
            print(f"{m.name:40s} {m.file:28s} {' '.join(m.tests)}")
        return 0
    with tempfile.TemporaryDirectory(prefix="mutants-") as root:
        copy_repo(root)
        tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        print(f"{len(chosen)} mutants; first the unmutated copy on their {len(tests)} tests", flush=True)
        if run_tests(root, tests) != 0:
            print("mutants: the tests fail without any mutant; fix them first", file=sys.stderr)
            return 2
        survivors = []
        for m in chosen:
            path = os.path.join(root, m.file)
            with open(path, encoding="utf-8") as f:
                original = f.read()
            if original.count(m.old) != 1:
                print(f"mutants: {m.file}: the text of mutant {m.name!r} occurs {original.count(m.old)} times "
                      "(must be once); update the mutant", file=sys.stderr)
                return 2
            with open(path, "w", encoding="utf-8") as f:
                f.write(original.replace(m.old, m.new))
            t0 = time.perf_counter()
            rc = run_tests(root, m.tests)
            with open(path, "w", encoding="utf-8") as f:
                f.write(original)
            verdict = "killed" if rc == 1 else ("SURVIVED" if rc == 0 else f"error (pytest exit {rc})")
            if rc != 1:
                survivors.append(m.name)
            print(f"  {verdict:9s} {m.name:40s} {time.perf_counter() - t0:5.1f} s", flush=True)
    print(f"{len(chosen) - len(survivors)} of {len(chosen)} mutants killed"
          + (f"; not killed: {', '.join(survivors)}" if survivors else ""))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
