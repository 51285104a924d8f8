"""Demo: a small ExGra-Med model trained on the synthetic demo data set, on a laptop CPU.

    python tools/make_demo_data.py --out demo_out/data
    python launch/train.py --config=configs/demo.py --workdir=demo_out/run \
        --config.data.json_paths=demo_out/data/instruct.json,demo_out/data/vqa/train.json

``make demo`` runs the whole chain (data, training, VQA evaluation, Hugging Face export).
The data root can also be set with ``--config=configs/demo.py:DATA_DIR``.
"""

import os

from exgra_jax.train.defaults import base_config


def get_config(arg: str | None = None):
    data_dir = arg or "demo_out/data"
    c = base_config(
        "tiny",
        image_size=64, patch_size=16, vision_width=64, vision_layers=3, vision_heads=4,
        vision_mlp=128, dci_ranges=((0, 1), (1, 2)), sci_layers=(1,), sti_layers=(1,),
        sti_pool=4,
        # The demo tokenizer: 999 word pieces + [PAD] 999, <im_patch> 1000, <im_start>,
        # <im_end>.
        vocab_size=1003, hidden_size=128, mlp_size=352, num_layers=4, num_heads=4,
        num_kv_heads=2, max_positions=512, image_token_id=1000, pad_token_id=999,
    )
    c.tokenizer = os.path.join(data_dir, "tokenizer")
    c.data.json_paths = (os.path.join(data_dir, "instruct.json"),
                         os.path.join(data_dir, "vqa", "train.json"))
    c.data.image_folder = os.path.join(data_dir, "images")
    # With the demo tokenizer (trained on the templated text) the longest training
    # conversation, image tokens included, is 114 tokens.
    c.data.max_len = 128
    # Answer-only texts of the alignment loss: responses are at most 30 tokens; 59 of the
    # 320 extended instruction answers (up to 125 tokens) lose their tail.
    c.data.response_len = 32
    c.data.caption_len = 96
    c.data.image_aspect = "crop"
    c.eval.json_paths = (os.path.join(data_dir, "vqa", "test.json"),)
    c.eval.image_folder = os.path.join(data_dir, "images")
    c.eval.candidates = os.path.join(data_dir, "vqa", "candidate.json")
    c.eval.batch_size = 16
    c.eval.max_new_tokens = 12
    # The demo trains on "<image>\nquestion" only, so it is asked the same way.
    c.eval.image_first = True

    c.alignment.k = 5
    c.alignment.graph_scope = "global"  # one CPU device: the graph spans the batch

    c.train.global_batch_size = 16
    # About 1.5 passes over the 320 instruction records and ~4500 VQA questions.
    c.train.total_steps = 450
    c.train.lr = 2e-3
    c.train.warmup_frac = 0.03
    c.train.clip_norm = 1.0
    c.train.log_every = 20
    c.train.checkpoint_every = 200
    c.train.async_checkpoint = True
    # The demo trains the whole model from scratch, tower included.
    c.train.trainable = (r"^model/", r"^alignment/")
    c.train.frozen = ()
    c.mesh.fsdp = -1
    return c
