"""Builds the training data of hunyuan-tiny / hunyuan-tiny-draft from the King James Bible.

Why it exists: train.py needs token streams in our own tokenizer (trained here by
`hyserve train-tokenizer`), with a held-out split that never leaks into training or into the
tokenizer, and an "edit" task (KJV passage -> modern English) whose answers mostly copy the
prompt, so the models learn in-context copying (what speculative decoding and prompt-lookup
benefit from).

    python3 scripts/train/prepare.py \
        --kjv .dev/train/corpus/kjv.txt --hyserve target/debug/hyserve --out .dev/train/data

Steps:
  1. parse kjv.txt ("Ge1:1 In the beginning ...") into 1189 chapters; a chapter is held out when
     its 0-based global index % 20 == 7;
  2. plain documents: "{Book} {chapter}\\n" + one verse per line, one per chapter;
  3. tokenizer: trained on the training chapters' plain documents plus their modernised verses
     (OUT/tokenizer_text.txt -> OUT/tokenizer/{hy.tiktoken, tokenizer_config.json});
  4. edit documents: consecutive passages of 2-5 verses (< ~200 tokens), each a Hunyuan chat turn
     <|startoftext|>Put this into modern English:\\n{passage}<|extra_0|>{modernised}<|eos|>;
  5. tokenise with tiktoken (same regex and ranks as our Rust tokenizer; checked against
     `hyserve generate --json` on a throwaway random model) and write
     OUT/train.bin        uint16 LE, all training documents, shuffled at document level,
                          joined by <|endoftext|>
     OUT/valid_plain.bin  held-out plain documents (same format)
     OUT/valid_edit.bin   held-out edit documents
     OUT/heldout.jsonl    one object per held-out passage (prompts for evaluation)
     OUT/meta.json        counts, special ids, corpus sha256, the split rule.
"""

import argparse
import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import unicodedata

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

# Hunyuan pre-tokenizer regex (docs/hunyuan-large.md; HUNYUAN_PATTERN in model/src/tokenizer.rs).
HUNYUAN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                   r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

BOOKS = [
    ("Ge", "Genesis"), ("Exo", "Exodus"), ("Lev", "Leviticus"), ("Num", "Numbers"),
    ("Deu", "Deuteronomy"), ("Josh", "Joshua"), ("Jdgs", "Judges"), ("Ruth", "Ruth"),
    ("1Sm", "1 Samuel"), ("2Sm", "2 Samuel"), ("1Ki", "1 Kings"), ("2Ki", "2 Kings"),
    ("1Chr", "1 Chronicles"), ("2Chr", "2 Chronicles"), ("Ezra", "Ezra"), ("Neh", "Nehemiah"),
    ("Est", "Esther"), ("Job", "Job"), ("Psa", "Psalms"), ("Prv", "Proverbs"),
    ("Eccl", "Ecclesiastes"), ("SSol", "Song of Solomon"), ("Isa", "Isaiah"), ("Jer", "Jeremiah"),
    ("Lam", "Lamentations"), ("Eze", "Ezekiel"), ("Dan", "Daniel"), ("Hos", "Hosea"),
    ("Joel", "Joel"), ("Amos", "Amos"), ("Obad", "Obadiah"), ("Jonah", "Jonah"), ("Mic", "Micah"),
    ("Nahum", "Nahum"), ("Hab", "Habakkuk"), ("Zep", "Zephaniah"), ("Hag", "Haggai"),
    ("Zec", "Zechariah"), ("Mal", "Malachi"), ("Mat", "Matthew"), ("Mark", "Mark"),
    ("Luke", "Luke"), ("John", "John"), ("Acts", "Acts"), ("Rom", "Romans"),
    ("1Cor", "1 Corinthians"), ("2Cor", "2 Corinthians"), ("Gal", "Galatians"),
    ("Eph", "Ephesians"), ("Phi", "Philippians"), ("Col", "Colossians"),
    ("1Th", "1 Thessalonians"), ("2Th", "2 Thessalonians"), ("1Tim", "1 Timothy"),
    ("2Tim", "2 Timothy"), ("Titus", "Titus"), ("Phmn", "Philemon"), ("Heb", "Hebrews"),
    ("Jas", "James"), ("1Pet", "1 Peter"), ("2Pet", "2 Peter"), ("1Jn", "1 John"),
    ("2Jn", "2 John"), ("3Jn", "3 John"), ("Jude", "Jude"), ("Rev", "Revelation"),
]

SPLIT_RULE = "chapter held out when its 0-based global chapter index % 20 == 7"
EDIT_INSTRUCTION = "Put this into modern English:\n"
MAX_PASSAGE_TOKENS = 200

# ------------------------------------------------------------------------------------------------
# Modernizer: case-preserving whole-word replacements (deterministic, context free except "thine")
# ------------------------------------------------------------------------------------------------

MODERN = {
    # pronouns
    "thee": "you", "thou": "you", "ye": "you", "thy": "your", "thyself": "yourself",
    # be / have / do / modal verbs
    "art": "are", "wast": "were", "wert": "were", "hath": "has", "hast": "have", "hadst": "had",
    "doth": "does", "dost": "do", "doest": "do", "doeth": "does", "didst": "did",
    "shalt": "shall", "wilt": "will", "canst": "can", "couldest": "could", "wouldest": "would",
    "shouldest": "should", "mayest": "may", "mightest": "might",
    # -est (second person) verbs
    "knowest": "know", "sayest": "say", "seest": "see", "goest": "go", "comest": "come",
    "camest": "came", "givest": "give", "gavest": "gave", "takest": "take", "makest": "make",
    "madest": "made", "hearest": "hear", "heardest": "heard", "lovest": "love",
    "speakest": "speak", "believest": "believe", "keepest": "keep", "sendest": "send",
    # -eth (third person) verbs
    "saith": "says", "cometh": "comes", "goeth": "goes", "maketh": "makes", "giveth": "gives",
    "taketh": "takes", "knoweth": "knows", "loveth": "loves", "believeth": "believes",
    "heareth": "hears", "seeth": "sees", "liveth": "lives", "speaketh": "speaks",
    "keepeth": "keeps", "walketh": "walks", "dwelleth": "dwells", "sitteth": "sits",
    "standeth": "stands", "bringeth": "brings", "putteth": "puts", "receiveth": "receives",
    "sendeth": "sends", "worketh": "works", "findeth": "finds", "eateth": "eats",
    "drinketh": "drinks", "leadeth": "leads", "turneth": "turns", "calleth": "calls",
    "judgeth": "judges", "asketh": "asks", "seeketh": "seeks", "openeth": "opens",
    "falleth": "falls", "riseth": "rises", "passeth": "passes", "abideth": "abides",
    "trusteth": "trusts", "feareth": "fears", "dieth": "dies", "sinneth": "sins",
    "hateth": "hates", "sheweth": "shows", "remaineth": "remains", "endureth": "endures",
    "answereth": "answers", "looketh": "looks", "lieth": "lies", "killeth": "kills",
    "hideth": "hides", "sayeth": "says", "thinketh": "thinks", "requireth": "requires",
    # old past tenses and other words
    "spake": "spoke", "brake": "broke", "sware": "swore", "begat": "fathered", "durst": "dared",
    "wist": "knew", "wot": "know", "shew": "show", "shewed": "showed", "unto": "to",
    "yea": "yes", "nay": "no", "verily": "truly", "whither": "where", "hither": "here",
    "thither": "there", "whence": "where", "ere": "before", "oft": "often",
    "peradventure": "perhaps", "howbeit": "however", "twain": "two", "aught": "anything",
    "naught": "nothing", "whoso": "whoever", "whosoever": "whoever",
}

_WORD = re.compile(r"[A-Za-z]+")


def _match_case(src, rep):
    if len(src) > 1 and src.isupper():
        return rep.upper()
    if src[0].isupper():
        return rep[0].upper() + rep[1:]
    return rep


def modernize(text):
    """Whole-word, case-preserving replacements from MODERN; "thine" becomes "your" before a word
    and "yours" otherwise ("thine house" -> "your house", "is thine." -> "is yours.")."""

    def repl(m):
        w = m.group(0)
        lw = w.lower()
        if lw == "thine":
            nxt = text[m.end():m.end() + 2]
            rep = "your" if re.match(r" [A-Za-z]", nxt) else "yours"
        else:
            rep = MODERN.get(lw)
            if rep is None:
                return w
        return _match_case(w, rep)

    return _WORD.sub(repl, text)


# ------------------------------------------------------------------------------------------------
# Corpus
# ------------------------------------------------------------------------------------------------


def parse_kjv(path):
    """[(abbrev, book name, chapter, [(verse number, text)])] in corpus order."""
    names = dict(BOOKS)
    order = [b for b, _ in BOOKS]
    line_re = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)$")
    chapters = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            m = line_re.match(line)
            if not m:
                raise ValueError(f"{path}:{n}: unparsed line {line[:60]!r}")
            book, ch, vs, text = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
            if book not in names:
                raise ValueError(f"{path}:{n}: unknown book {book!r}")
            text = " ".join(text.split())  # trims and collapses the few double spaces
            if not chapters or chapters[-1][0] != book or chapters[-1][2] != ch:
                chapters.append((book, names[book], ch, []))
            chapters[-1][3].append((vs, text))
    seen = []
    for b, *_ in chapters:
        if not seen or seen[-1] != b:
            seen.append(b)
    if seen != order:
        raise ValueError("books are not in the expected order")
    return chapters


def plain_document(name, ch, verses):
    return f"{name} {ch}\n" + "".join(t + "\n" for _, t in verses)


def passage_length(book, ch, start):
    """Deterministic 2..5 from a hash (independent of Python/NumPy RNG versions)."""
    h = hashlib.sha256(f"passage:{book}:{ch}:{start}".encode()).digest()
    return 2 + h[0] % 4


def split_passages(book, ch, verses, count_tokens):
    """Consecutive passages of 2-5 verses whose text is under MAX_PASSAGE_TOKENS tokens (shrunk
    to fewer verses when too long; a single verse when even two are too long)."""
    out, i = [], 0
    while i < len(verses):
        n = min(passage_length(book, ch, i), len(verses) - i)
        if len(verses) - (i + n) == 1 and n < 5:
            n += 1  # do not leave a lone verse at the chapter's end
        while n > 1 and count_tokens("\n".join(t for _, t in verses[i:i + n])) >= MAX_PASSAGE_TOKENS:
            n -= 1
        out.append(verses[i:i + n])
        i += n
    return out


def edit_turn(passage_text, modern_text):
    """(full training document, prompt part) of one edit example as a Hunyuan chat turn."""
    user = EDIT_INSTRUCTION + passage_text
    prompt = f"<|startoftext|>{user}<|extra_0|>"
    return prompt + modern_text + "<|eos|>", prompt, user


# ------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------


def load_tiktoken(tok_dir):
    import tiktoken

    ranks = {}
    with open(os.path.join(tok_dir, "hy.tiktoken")) as f:
        for line in f:
            if line.strip():
                b64, r = line.split()
                ranks[base64.b64decode(b64)] = int(r)
    with open(os.path.join(tok_dir, "tokenizer_config.json")) as f:
        added = json.load(f)["added_tokens_decoder"]
    specials = {v["content"]: int(k) for k, v in added.items()}
    enc = tiktoken.Encoding(name="hyserve-kjv", pat_str=HUNYUAN_PATTERN,
                            mergeable_ranks=ranks, special_tokens=specials)
    return enc, specials, len(ranks)


def encode(enc, text):
    return enc.encode(unicodedata.normalize("NFC", text), allowed_special="all")


def check_against_hyserve(hyserve, tok_dir, enc, specials, samples, chat_samples):
    """Encodes samples with `hyserve generate --json` on a throwaway random draft-sized model that
    carries our tokenizer, and compares the prompt ids with tiktoken's."""
    sys.path.insert(0, HERE)
    import torch

    import hunyuan

    with tempfile.TemporaryDirectory() as d:
        cfg = hunyuan.make_config("draft", specials)
        m = hunyuan.HunyuanForCausalLM(cfg)
        m.init_weights(0)
        hunyuan.export_checkpoint({k: v.to(torch.bfloat16) for k, v in m.state_dict().items()}, cfg, d)
        for fn in ("hy.tiktoken", "tokenizer_config.json"):
            with open(os.path.join(tok_dir, fn), "rb") as src, open(os.path.join(d, fn), "wb") as dst:
                dst.write(src.read())
        cases = [(t, False) for t in samples] + [(t, True) for t in chat_samples]
        for text, chat in cases:
            cmd = [hyserve, "generate", "--model", d, "--prompt", text, "--max-tokens", "1", "--json"]
            if chat:
                cmd.append("--chat")
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd[:3])} failed: {r.stderr[-2000:]}")
            got = json.loads(r.stdout.strip().splitlines()[-1])["prompt_ids"]
            want = encode(enc, f"<|startoftext|>{text}<|extra_0|>" if chat else text)
            if got != want:
                raise RuntimeError(f"tokenizer mismatch on {text[:60]!r} (chat={chat}):\n"
                                   f"  hyserve  {got[:40]}\n  tiktoken {want[:40]}")
            print(f"  agree ({'chat' if chat else 'text'}, {len(got)} tokens): {text[:50]!r}")


# ------------------------------------------------------------------------------------------------


def write_u16(path, ids):
    a = np.asarray(ids, dtype=np.int64)
    if a.size and (a.min() < 0 or a.max() > 65535):
        raise ValueError("token id out of uint16 range")
    a.astype("<u2").tofile(path)
    return int(a.size)


def join_docs(docs, eot):
    out = []
    for i, d in enumerate(docs):
        if i:
            out.append(eot)
        out.extend(d)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kjv", default=".dev/train/corpus/kjv.txt")
    ap.add_argument("--hyserve", default="target/debug/hyserve")
    ap.add_argument("--out", default=".dev/train/data")
    ap.add_argument("--ranks", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=1234, help="document shuffle seed")
    ap.add_argument("--skip-check", action="store_true", help="do not compare with hyserve's tokenizer")
    args = ap.parse_args()
    t0 = time.time()
    os.makedirs(args.out, exist_ok=True)

    with open(args.kjv, "rb") as f:
        kjv_sha = hashlib.sha256(f.read()).hexdigest()
    chapters = parse_kjv(args.kjv)
    n_verses = sum(len(c[3]) for c in chapters)
    print(f"[prepare] {len(chapters)} chapters, {n_verses} verses, sha256 {kjv_sha[:16]}...", flush=True)
    if len(chapters) != 1189:
        sys.exit(f"expected 1189 chapters, got {len(chapters)}")
    train_ch = [c for i, c in enumerate(chapters) if i % 20 != 7]
    held_ch = [c for i, c in enumerate(chapters) if i % 20 == 7]
    print(f"[prepare] split: {len(train_ch)} training chapters, {len(held_ch)} held out ({SPLIT_RULE})", flush=True)

    # 1. tokenizer text: training plain documents + their modernised verses
    tok_text_path = os.path.join(args.out, "tokenizer_text.txt")
    with open(tok_text_path, "w", encoding="utf-8") as f:
        for _, name, ch, verses in train_ch:
            f.write(plain_document(name, ch, verses))
        for _, name, ch, verses in train_ch:
            f.write("".join(modernize(t) + "\n" for _, t in verses))
    print(f"[prepare] wrote {tok_text_path} ({os.path.getsize(tok_text_path) / 1e6:.1f} MB); training the tokenizer", flush=True)
    tok_dir = os.path.join(args.out, "tokenizer")
    subprocess.run([args.hyserve, "train-tokenizer", "--text", tok_text_path, "--ranks", str(args.ranks),
                    "--out", tok_dir], check=True)
    enc, specials, n_ranks = load_tiktoken(tok_dir)
    eot = specials["<|endoftext|>"]
    n_ids = n_ranks + len(specials)
    print(f"[prepare] tokenizer: {n_ranks} ranks + {len(specials)} specials = {n_ids} ids "
          f"(<|endoftext|> {eot}, <|startoftext|> {specials['<|startoftext|>']}, "
          f"<|eos|> {specials['<|eos|>']}, <|extra_0|> {specials['<|extra_0|>']})", flush=True)

    # 2. documents
    def count_tokens(text):
        return len(encode(enc, text))

    def chapter_docs(ch_list, held):
        plain, edits, records = [], [], []
        for book, name, ch, verses in ch_list:
            plain.append(encode(enc, plain_document(name, ch, verses)))
            for p in split_passages(book, ch, verses, count_tokens):
                text = "\n".join(t for _, t in p)
                modern = modernize(text)
                doc, prompt, user = edit_turn(text, modern)
                edits.append(encode(enc, doc))
                if held:
                    first, last = p[0][0], p[-1][0]
                    ref = f"{name} {ch}:{first}" + (f"-{last}" if last != first else "")
                    records.append({"ref": ref, "book": name, "chapter": ch, "passage": text,
                                    "modern": modern, "prompt_edit": user,
                                    "prompt_free": f"{name} {ch}\n{p[0][1]}\n"})
        return plain, edits, records

    tr_plain, tr_edit, _ = chapter_docs(train_ch, held=False)
    va_plain, va_edit, held_records = chapter_docs(held_ch, held=True)
    print(f"[prepare] documents: train {len(tr_plain)} plain + {len(tr_edit)} edit, "
          f"held out {len(va_plain)} plain + {len(va_edit)} edit", flush=True)

    # 3. check the tiktoken encoding against our Rust tokenizer
    if not args.skip_check:
        print("[prepare] comparing tiktoken with `hyserve generate --json`", flush=True)
        v = held_ch[0][3]
        samples = [train_ch[0][3][0][1], v[0][1], "\n".join(t for _, t in v[:3]),
                   plain_document(held_ch[1][1], held_ch[1][2], held_ch[1][3][:2]),
                   modernize(v[1][1]) + "  trailing  spaces \n\n"]
        chat_samples = [held_records[0]["prompt_edit"], held_records[-1]["prompt_edit"]]
        check_against_hyserve(args.hyserve, tok_dir, enc, specials, samples, chat_samples)
        prompt_ids = encode(enc, f"<|startoftext|>{held_records[0]['prompt_edit']}<|extra_0|>")
        doc_ids = va_edit[0]
        if doc_ids[:len(prompt_ids)] != prompt_ids:
            sys.exit("an edit document does not start with its chat prompt's tokens")

    # 4. write
    order = np.random.default_rng(args.seed).permutation(len(tr_plain) + len(tr_edit))
    all_train = tr_plain + tr_edit
    counts = {
        "train.bin": write_u16(os.path.join(args.out, "train.bin"), join_docs([all_train[i] for i in order], eot)),
        "valid_plain.bin": write_u16(os.path.join(args.out, "valid_plain.bin"), join_docs(va_plain, eot)),
        "valid_edit.bin": write_u16(os.path.join(args.out, "valid_edit.bin"), join_docs(va_edit, eot)),
    }
    with open(os.path.join(args.out, "heldout.jsonl"), "w", encoding="utf-8") as f:
        for r in held_records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tok_bytes = os.path.getsize(tok_text_path)
    tok_tokens = sum(len(d) for d in tr_plain) + sum(count_tokens(modernize(t) + "\n") for c in train_ch for _, t in c[3])
    meta = {
        "corpus": os.path.basename(args.kjv),
        "corpus_sha256": kjv_sha,
        "chapters": len(chapters),
        "verses": n_verses,
        "split_rule": SPLIT_RULE,
        "heldout_chapters": [f"{c[1]} {c[2]}" for c in held_ch],
        "tokens": counts,
        "tokens_train_plain": sum(len(d) for d in tr_plain),
        "tokens_train_edit": sum(len(d) for d in tr_edit),
        "documents": {"train_plain": len(tr_plain), "train_edit": len(tr_edit),
                      "valid_plain": len(va_plain), "valid_edit": len(va_edit)},
        "heldout_passages": len(held_records),
        "tokenizer": {"ranks": n_ranks, "ids": n_ids, "specials": {k: specials[k] for k in (
            "<|endoftext|>", "<|startoftext|>", "<|bos|>", "<|eos|>", "<|pad|>", "<|extra_0|>",
            "<|extra_4|>", "<|extra_5|>")},
            "bytes_per_token_on_training_text": round(tok_bytes / max(tok_tokens, 1), 3)},
        "edit_instruction": EDIT_INSTRUCTION,
        "max_passage_tokens": MAX_PASSAGE_TOKENS,
        "shuffle_seed": args.seed,
        "format": "uint16 little-endian token ids; documents joined by <|endoftext|>",
    }
    with open(os.path.join(args.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    for k, v in counts.items():
        print(f"[prepare] {k}: {v:,} tokens", flush=True)
    print(f"[prepare] {len(held_records)} held-out passages -> heldout.jsonl; done in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
