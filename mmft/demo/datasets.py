"""Offline demo datasets as shards: openclipart (GENERAL and DOMAIN splits) and textile inspection.

    build_demo_data("data/demo")  # -> data/demo/openclipart/{general,domain}/, data/demo/textile/

openclipart: the public-domain SVGs of Debian's `openclipart-svg`, rendered to square PNGs (alpha
on white) and captioned from their cleaned <dc:title>, description and keywords. DOMAIN is the
whole animals + food + plants categories; GENERAL is every other category.
textile: the 2,000 simulated fabric images of PyPI `conformal-clip-data` (nominal / local defect /
global defect), kept at native 250 px so 5-8 px defects survive, with class-specific captions.
A build whose stats.json matches the requested settings is not redone.
"""
from __future__ import annotations

import contextlib
import hashlib
import html
import io
import json
import re
import signal
import threading
import time
from collections import Counter
from pathlib import Path

from mmft.data.shard_writer import assign_splits, check_output_dir, shard_records, write_shards
from mmft.io import write_json

DEFAULT_SVG_ROOT = Path("/usr/share/openclipart/svg")
DOMAIN_CATEGORIES = ("animals", "food", "plants")
OPENCLIPART_SPLITS = {
    "domain": {"train": 0.60, "val": 0.10, "test": 0.30},  # ~400 pairs: a test gallery of ~115 images
    "general": {"train": 0.80, "val": 0.05, "test": 0.15},
}
TEXTILE_SPLITS = {"train": 0.6, "val": 0.2, "test": 0.2}  # 1200/400/400 of 2000, stratified by class
TEXTILE_CAPTIONS = {
    "nominal": [
        "a woven textile with no defect",
        "a defect-free grey woven fabric with diagonal streaks",
        "a nominal fabric sample with a regular weave",
        "a close-up of normal woven cloth without flaws",
    ],
    "local": [
        "a fabric sample with a small local defect (a speckled blob)",
        "a woven textile with a tiny speckled spot in one place",
        "a grey fabric with a local flaw, a small blob of speckles",
        "a close-up of woven cloth with a small localized defect",
    ],
    "global": [
        "a fabric with a global texture defect, finer and more even weave",
        "a woven textile whose whole texture is too fine and even",
        "a grey fabric with a global defect across the entire weave",
        "a close-up of woven cloth with a uniform texture defect everywhere",
    ],
}
SAMPLES_PER_SHARD = 256
SOURCES = ("openclipart", "textile")


# ---------------------------------------------------------------- openclipart: metadata and cleaning
CLEANING_VERSION = 1  # bump when the rules below change, so finished builds are redone
_NS_DC = "{http://purl.org/dc/elements/1.1/}"
_BOILERPLATE = re.compile(
    r"^part of (the )?.*collection|\b(svg|icons?) ?(theme|collection|set)\b|clip ?art collection|^(untitled|"
    r"drawing|image|svg|layer ?\d*|new document.*)$|@|https?://|www\.", re.IGNORECASE)
# "Clipart by Nicu Buculei - pear" -> "pear"
_CLIPART_BY = re.compile(r"^clip ?art by [^-]+-\s*", re.IGNORECASE)
_JUNK_DESCRIPTION = re.compile(
    r"@|hash\(0x|eps converted|https?://|www\.|\b(made|created?|drawn|done) (with|in|using) "
    r"(the )?(inkscape|sodipodi|illustrator)", re.IGNORECASE)
_STOP_KEYWORDS = frozenset({
    "hash", "unsorted", "special", "icon", "icons", "theme", "clipart", "clip art", "image", "svg", "magick",
    "media", "openclipart", "drawing", "vector", "inkscape", "misc", "other", "lemon theme icon",
    "public domain"})
# Italian (and a few French) words seen in openclipart titles: function words plus the nouns of the
# foreign-titled drawings; a title is foreign when more than half its words are here, so bilingual
# titles ("Gatto Cat", "Farfalla - Butterfly") survive.
_FOREIGN = frozenset("""
di del della dello delle dei degli da col con per il gli uno una sul sulla sui nella nel alla al e ed le la lo
io noi mie mio mia tante che abitazione giardino acquila aquila aglio albero analisi sangue anelli antilope
appunti frontale architetto attenzione rotondo barattolo pillole bibliografia bicicletta binocolo borsa
estiva bottiglia vino pregiato donna carriera bussola calamita calcolatrice camicia seta canguro cani
gatti capitello modanatura modanature carta cartella casa sogni campagna plurifamigliare verde casco
microfono cassa epoca negozio cestino pieno vuoto cesto montagna chiave cigni bianchi neri cigno notte
palude spalle cinepresa clessidra coccinella coccinellona posate coniglio cubo giallo rosso decorazione
demolizione costruzione dente diagramma dinosauri dinosauro incinta elefante esperimento chimico fabbrica
farfalla contorno semplice stilizzata fata fatina ferro stiro finestra estendi ridimensiona finestre
sovrapposte foglio mondo forbici pettine forchettoni grigliata formichina formicona formulario fuoco
campeggio gabbiano gallo profilo gattina gatto nero gelato griglia gufo civetta insetto bambina uomo
istogramma prugna lampada lana lattine birra tigri preferite lente meno normale leone lettera libellula
libro ricette cucina italiana livella lucchetto grigio ottone lucertola arrotolata lucertolona lucertolone
lumaca macchina caffe fotografica digitale mantide religiosa marchio gallina mattone mazzo fiori medicina
dottore microscopio frullatore motivo geometrico moschito stecchito mostriciattolo insieme calici nonno
nucleare simbolo ontologia orme neve orologio parete orso pacco regalo pace bene paesaggio marino
palloncini pallone aerestatico aerostatico pannocchia gran turco pattinatrice pattinatrici ghiaccio
pattino pecora peperoncino pera pesca pescetto arancione pinguino piccolo pinzatrice stagioni pollo
poltrona ufficio pomodori pomodoro portafoglio profilati profilato acciaio proiettore provetta provette
pulsante puntine quattro farfalle ragnetto incazzato ragno figo ramarro rana ravanello rilievo ruota
dentata grigia sacco pelo salvagente sapone liquido schermo scodella scolapasta pentola secchio spugna
sedia ombrelloni legno signore signorina egizio emergenza sanitaria giapponese siringa stambecco
valdostano valdostana stampante stemma comune stormo uccelli subacqueo tabella tacchino tasto tatuaggio
tatuaggi tavolo tavolozza tazza teiera telecamera telefono televisore telecomando tenda tigre topo toro
tramonto torta trattore uccello bianco unita rigido utensile sega utensili cacciavite utente singolo
utenti vacca pezzata rossa valigie viti zanzara cretina zucca cavallo cane pesce mela arancia fiore mucca
maiale vaso acqua sole luna stella albero alberi foglia fiore fragola uva limone funghi fungo formaggio
pane dolce bicchiere piatto forchetta coltello cucchiaio scatola scatole collant come si
de du des les pour avec contre sortie issue secours defense fumer eteindre eau risque obligatoire chutes
extincteur abeille coccinelle libellule mante religieuse glace amibe punaise produit chimique rayonnement
pieds environnement sauvetage incendie lutte interdit interdiction
""".split())  # noqa: SIM905 (a word list reads best as text)


def _text(el) -> str:
    return html.unescape(" ".join("".join(el.itertext()).split()))


def parse_svg_meta(data: bytes) -> dict | None:
    """<cc:Work> metadata of an SVG: title, description, keywords, creator; None if the XML is broken."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(data)
    except ET.ParseError:
        return None
    work = next((el for el in root.iter() if el.tag.endswith("}Work")), None)
    meta = {"title": "", "description": "", "keywords": [], "creator": ""}
    if work is None:
        return meta
    for child in work:
        tag = child.tag[len(_NS_DC):] if child.tag.startswith(_NS_DC) else ""
        if tag in ("title", "description"):
            meta[tag] = _text(child)
        elif tag == "subject":
            meta["keywords"] = [_text(li) for li in child.iter() if li.tag.endswith("}li")]
        elif tag == "creator":
            meta["creator"] = " ".join(_text(t) for t in child.iter(_NS_DC + "title"))
    return meta


def normalize_title(title: str) -> str:
    """Strip "Clipart by X - " prefixes and e-mail notes, underscores and version digits ("flower2")."""
    t = _CLIPART_BY.sub("", html.unescape(title))
    t = re.sub(r"\([^)]*@[^)]*\)|#\d+", " ", t)
    t = re.sub(r"\b([A-Za-z]{3,})\d+\b", r"\1", t.replace("_", " "))
    t = re.sub(r"\(\s*b\s*(and|&)\s*w\s*\)|\bbw$", "(black and white)", t, flags=re.IGNORECASE)
    return " ".join(t.split()).strip(" -.,:;")


def strip_creator(title: str, creator: str) -> str:
    """Remove the author's name from a title ("Coccinella Rollandin" -> "Coccinella")."""
    names = {w.lower() for w in re.findall(r"[^\W\d_]{4,}", creator)}
    if not names:
        return title
    kept = [w for w in title.split() if w.lower().strip("()[],.:;-") not in names]
    return " ".join(kept).strip(" -.,:;")


def title_problem(title: str) -> str | None:
    """Why a normalised title is no caption: no_title, boilerplate, code_like, foreign; None if fine."""
    if not title:
        return "no_title"
    if _BOILERPLATE.search(title):
        return "boilerplate_title"
    words = re.findall(r"[^\W\d_]+", title)  # runs of letters, accents included
    real = [w for w in words if len(w) >= 3 and re.search(r"[aeiouyàáâäèéêëìíîïòóôöùúûü]", w, re.IGNORECASE)]
    if not real or re.search(r"\.(svg|png|py|eps|ai)\b", title, re.IGNORECASE):
        return "code_like_title"  # "fc23", "m", "TV", "books-aj.svg"
    low = re.findall(r"[a-zà-ù]+", title.lower())
    if sum(w in _FOREIGN for w in low) * 2 > len(low):
        return "foreign_title"  # mostly Italian
    return None


def group_stem(title: str) -> str:
    """Near-duplicate group of a title: lower case, without parentheses and digits ("ice cream cone")."""
    stem = re.sub(r"\([^)]*\)|\d+", " ", title.lower())
    return " ".join(re.sub(r"[^a-z ]+", " ", stem).split()) or title.lower()


def clean_description(desc: str, title: str, repeats: int) -> str | None:
    """A usable description caption (first ~200 characters, at a word boundary), or None for junk."""
    d = " ".join(desc.split())
    if (not d or _JUNK_DESCRIPTION.search(d) or repeats >= 8 or d.lower().strip(" .") == title.lower()
            or len(re.sub(r"[^A-Za-z]", "", d)) < 3 or title_problem(d) == "foreign_title"):
        return None
    return d if len(d) <= 200 else d[:200].rsplit(" ", 1)[0] + "..."


def clean_keywords(keywords: list[str], title: str, creator: str, max_n: int = 8) -> list[str]:
    """Keyword bag without filler ("hash", "icons"), author names, codes and the title itself."""
    out: list[str] = []
    for kw in keywords:
        k = " ".join(kw.lower().replace("_", " ").split())
        if (len(k) < 3 or k in _STOP_KEYWORDS or re.search(r"[\d@.]", k) or k == title.lower()
                or (creator and k == creator.lower()) or k in out):
            continue
        out.append(k)
    return out[:max_n]


def _scan(svg_root: Path, skipped: Counter) -> list[dict]:
    """Parse every SVG (sorted paths); drop byte-identical copies and broken XML."""
    seen: set[str] = set()
    out = []
    for i, path in enumerate(sorted(svg_root.rglob("*.svg"))):
        data = path.read_bytes()
        digest = hashlib.sha1(data).hexdigest()
        if digest in seen:
            skipped["duplicate_file"] += 1
            continue
        seen.add(digest)
        meta = parse_svg_meta(data)
        if meta is None:
            skipped["broken_xml"] += 1
            continue
        rel = path.relative_to(svg_root).as_posix()
        category = rel.split("/")[0] if "/" in rel else "unsorted"
        out.append({"key": f"{i:08d}", "path": path, "source": rel, "category": category, **meta})
    return out


def _clean(items: list[dict], skipped: Counter, parts: Counter) -> list[dict]:
    """Title rules in order (boilerplate, collections of 8+, codes, foreign, duplicates) -> records."""
    early = ("no_title", "boilerplate_title")
    for it in items:
        norm = normalize_title(it["title"])
        it["clean"] = strip_creator(norm, it["creator"])
        it["problem"] = "boilerplate_title" if norm and not it["clean"] else title_problem(it["clean"])
    counts = Counter(it["clean"].lower() for it in items if it["problem"] not in early)
    desc_counts = Counter(" ".join(it["description"].split()).lower() for it in items)
    records, taken = [], set()
    for it in items:
        low = it["clean"].lower()
        reason = it["problem"] if it["problem"] in early else None
        reason = reason or ("collection_title" if counts[low] >= 8 else it["problem"])
        reason = reason or ("duplicate_title" if low in taken else None)  # keep the first (sorted path)
        if reason:
            skipped[reason] += 1
            continue
        taken.add(low)
        records.append(_record(it, desc_counts[" ".join(it["description"].split()).lower()], parts))
    return records


def _record(it: dict, desc_repeats: int, parts: Counter) -> dict:
    """Captions [title, description?, "keywords: ..."?] and metadata of one kept drawing."""
    title = it["clean"]
    desc = clean_description(it["description"], title, desc_repeats)
    kws = clean_keywords(it["keywords"], title, it["creator"])
    parts["description_" + ("kept" if desc else "dropped" if it["description"] else "none")] += 1
    parts["keywords_" + ("kept" if kws else "none")] += 1
    captions = [title] + ([desc] if desc else []) + (["keywords: " + ", ".join(kws)] if kws else [])
    return {"key": it["key"], "path": it["path"], "source": it["source"], "captions": captions,
            "group": group_stem(title),
            "meta": {"category": it["category"], "title": it["title"], "keywords": kws}}


def clipart_records(svg_root: str | Path, skipped: Counter, parts: Counter | None = None, *, seed: int = 0,
                    limit: int | None = None) -> dict[str, list[dict]]:
    """Cleaned openclipart records with a split, by dataset: {"general": [...], "domain": [...]}.

    DOMAIN takes whole categories (DOMAIN_CATEGORIES); a GENERAL drawing whose group (title stem)
    also occurs in DOMAIN is dropped, so GENERAL training never sees a DOMAIN test subject.
    Splits are by group, so near-duplicate titles ("apple", "apple 2") stay on one side.
    """
    records = _clean(_scan(Path(svg_root), skipped), skipped, parts if parts is not None else Counter())
    domain = [r for r in records if r["meta"]["category"] in DOMAIN_CATEGORIES]
    domain_groups = {r["group"] for r in domain}
    general = []
    for r in records:
        if r["meta"]["category"] in DOMAIN_CATEGORIES:
            continue
        if r["group"] in domain_groups:
            skipped["general_overlaps_domain"] += 1
        else:
            general.append(r)
    out = {}
    for name, recs in (("general", general), ("domain", domain)):
        recs = list(assign_splits(recs, OPENCLIPART_SPLITS[name], by="group", seed=seed))
        out[name] = recs[:limit] if limit is not None else recs
    return out


# ---------------------------------------------------------------- openclipart: rendering
class _RenderTimeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Raise _RenderTimeout after `seconds` (SIGALRM; a no-op off the main thread or on Windows)."""
    on_main = threading.current_thread() is threading.main_thread()
    if not seconds or not hasattr(signal, "setitimer") or not on_main:
        yield
        return

    def _raise(signum, frame):
        raise _RenderTimeout

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def render_svg(data: bytes, size: int, margin: float = 0.04):
    """SVG bytes -> RGB PIL image of size x size: alpha on white, cropped to the drawing, centred.

    Rendered at twice the size first, so cropping away an oversized page keeps the drawing sharp.
    """
    import cairosvg
    from PIL import Image, ImageChops

    im = Image.open(io.BytesIO(cairosvg.svg2png(bytestring=data, output_width=2 * size))).convert("RGBA")
    flat = Image.new("RGB", im.size, (255, 255, 255))
    flat.paste(im, mask=im.getchannel("A"))
    ink = ImageChops.difference(flat, Image.new("RGB", im.size, (255, 255, 255))).convert("L")
    box = ink.point(lambda v: 255 if v > 16 else 0).getbbox()
    if box:
        flat = flat.crop(box)
    inner = max(1, round(size * (1 - 2 * margin)))
    flat.thumbnail((inner, inner), Image.LANCZOS)
    if box and max(flat.size) < inner:  # small drawings grow to fill the frame too
        scale = inner / max(flat.size)
        new_size = (max(1, round(flat.width * scale)), max(1, round(flat.height * scale)))
        flat = flat.resize(new_size, Image.LANCZOS)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(flat, ((size - flat.width) // 2, (size - flat.height) // 2))
    return canvas


def is_blank(im, min_ink: float = 0.002) -> bool:
    """Near-uniform image: under `min_ink` of its pixels differ from the most common grey level by > 24."""
    import numpy as np

    grey = np.asarray(im.convert("L"), dtype=np.int16)  # (H, W)
    mode = np.bincount(grey.ravel(), minlength=256).argmax()
    return float((np.abs(grey - mode) > 24).mean()) < min_ink


def _render_task(task: tuple) -> tuple[str, bytes | None, str | None]:
    """Worker: (key, path, size, timeout) -> (key, PNG bytes or None, skip reason or None)."""
    key, path, size, timeout_s = task
    try:
        with _time_limit(timeout_s):
            im = render_svg(Path(path).read_bytes(), size)
    except _RenderTimeout:
        return key, None, "render_timeout"
    except Exception:  # noqa: BLE001 (cairosvg raises many types on odd SVGs; all mean "cannot render this file")
        return key, None, "render_error"
    if is_blank(im):
        return key, None, "blank_render"
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return key, buf.getvalue(), None


def render_records(records: list[dict], skipped: Counter, *, image_size: int = 192, workers: int = 2,
                   timeout_s: float = 30.0, progress: bool = True, desc: str = "render",
                   failures: dict | None = None):
    """Yield records with rendered PNG bytes ("image", "ext"), in input order.

    Failures are counted in `skipped` by reason and, when given, listed in `failures` {source: reason}.
    """
    by_key = {r["key"]: r for r in records}
    tasks = [(r["key"], str(r["path"]), image_size, timeout_s) for r in records]
    pool = None
    if workers > 1 and len(tasks) > 1:
        import multiprocessing

        pool = multiprocessing.Pool(workers)
        results = pool.imap(_render_task, tasks, chunksize=4)
    else:
        results = map(_render_task, tasks)
    if progress:
        from tqdm.auto import tqdm

        results = tqdm(results, total=len(tasks), desc=desc, unit="svg")
    try:
        for key, png, reason in results:
            if png is None:
                skipped[reason] += 1
                if failures is not None:
                    failures[by_key[key]["source"]] = reason
                continue
            yield {**by_key[key], "image": png, "ext": "png"}
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()


def _settings_match(stats_path: Path, settings: dict) -> bool:
    """True when a finished build with the same settings is on disk (all its shards present)."""
    try:
        old = json.loads(stats_path.read_text())
    except (OSError, ValueError):
        return False
    if old.get("settings") != json.loads(json.dumps(settings)):
        return False
    shards = [stats_path.parent / sub / name for sub, d in old.get("datasets", {}).items()
              for s in d["splits"].values() for name in s["shards"]]
    return bool(shards) and all(p.is_file() for p in shards)


def build_openclipart(out_dir: str | Path, *, svg_root: str | Path = DEFAULT_SVG_ROOT, image_size: int = 192,
                      workers: int = 2, timeout_s: float = 30.0, limit: int | None = None, seed: int = 0,
                      overwrite: bool = False, progress: bool = True) -> dict:
    """Clean, render and shard openclipart into out_dir/{general,domain}/{train,val,test}-NNNNN.tar.

    image_size: side of the square PNG in pixels (the drawing fits inside, centred on white).
    timeout_s: a file rendering longer than this is skipped. limit: at most this many kept drawings
    per dataset (quick runs). Returns the stats also written to out_dir/stats.json.
    """
    out_dir, svg_root = Path(out_dir), Path(svg_root)
    if not svg_root.is_dir():
        raise FileNotFoundError(f"openclipart SVGs not found at {svg_root}; run `make demo` or "
                                "`apt-get install openclipart-svg`")
    try:
        import cairosvg  # noqa: F401  (checked here: inside the render workers it would fail per file)
    except (ImportError, OSError) as e:
        raise ModuleNotFoundError(f"rendering openclipart needs cairosvg and libcairo ({e}); run `make demo` "
                                  "or `pip install cairosvg`") from None
    settings = {"svg_root": str(svg_root), "image_size": image_size, "limit": limit, "seed": seed,
                "splits": OPENCLIPART_SPLITS, "domain": list(DOMAIN_CATEGORIES), "cleaning": CLEANING_VERSION}
    if not overwrite and _settings_match(out_dir / "stats.json", settings):
        _say(progress, f"openclipart: already built in {out_dir} (pass overwrite=True to rebuild)")
        return json.loads((out_dir / "stats.json").read_text())
    for sub in ("general", "domain"):
        check_output_dir(out_dir / sub, overwrite)
    start = time.time()
    skipped, parts = Counter(), Counter()
    datasets = clipart_records(svg_root, skipped, parts, seed=seed, limit=limit)
    stats = {"settings": settings, "datasets": {}, "caption_parts": dict(sorted(parts.items()))}
    cats: Counter = Counter()
    failures: dict[str, str] = {}
    for name, records in datasets.items():
        rendered = render_records(records, skipped, image_size=image_size, workers=workers,
                                  timeout_s=timeout_s, progress=progress, desc=f"openclipart {name}",
                                  failures=failures)
        written = write_shards(_count_categories(rendered, cats), out_dir / name,
                               samples_per_shard=SAMPLES_PER_SHARD)
        stats["datasets"][name] = {"splits": written["splits"], "written": sum(written["sizes"].values())}
        write_json(out_dir / name / "stats.json", stats["datasets"][name])
    stats["by_category"] = dict(cats.most_common())
    stats["skipped"] = dict(sorted(skipped.items()))
    stats["render_failures"] = dict(sorted(failures.items()))
    stats["seconds"] = round(time.time() - start, 1)
    write_json(out_dir / "stats.json", stats)
    return stats


def _count_categories(records, cats: Counter):
    for rec in records:
        cats[rec["meta"]["category"]] += 1
        yield rec


def textile_root() -> Path:
    """Folder of the simulated textile classes inside the installed `conformal-clip-data` package."""
    try:
        from importlib.resources import files

        root = Path(str(files("conformal_clip_data") / "data" / "textile_images" / "simulated"))
    except ModuleNotFoundError:
        raise FileNotFoundError("the textile images come from the package conformal-clip-data; "
                                "run `make demo` or `pip install conformal-clip-data`") from None
    return root


def build_textile(out_dir: str | Path, *, root: str | Path | None = None, limit: int | None = None,
                  seed: int = 0, overwrite: bool = False, progress: bool = True) -> dict:
    """Shard the textile classes into out_dir/{train,val,test}-NNNNN.tar (stratified 60/20/20).

    Images keep their native resolution and JPEG bytes. limit: at most this many images per class.
    """
    from mmft.data.shard_writer import iter_class_folders

    out_dir = Path(out_dir)
    root = Path(root) if root is not None else textile_root()
    settings = {"root": str(root), "limit": limit, "seed": seed, "splits": TEXTILE_SPLITS,
                "captions": TEXTILE_CAPTIONS}
    if not overwrite and _settings_match(out_dir / "stats.json", settings):
        _say(progress, f"textile: already built in {out_dir} (pass overwrite=True to rebuild)")
        return json.loads((out_dir / "stats.json").read_text())
    check_output_dir(out_dir, overwrite)
    start = time.time()
    records = iter_class_folders(root, ["a woven textile, {label}"], class_templates=TEXTILE_CAPTIONS)
    if limit is not None:
        records = _take_per_group(records, limit)
    skipped: Counter = Counter()
    stats = shard_records(records, out_dir, skipped, splits=TEXTILE_SPLITS, split_by="stratified", seed=seed,
                          samples_per_shard=SAMPLES_PER_SHARD, progress=progress, desc="textile")
    counts = Counter()
    for shard in Path(out_dir).glob("*.tar"):
        counts.update(_groups_in_shard(shard))
    dataset = {"splits": stats["splits"], "written": stats["written"]}
    stats = {"settings": settings, "datasets": {".": dataset},
             "skipped": stats["skipped"], "by_category": dict(sorted(counts.items())),
             "seconds": round(time.time() - start, 1)}
    write_json(out_dir / "stats.json", stats)
    return stats


def _take_per_group(records, limit: int):
    seen: Counter = Counter()
    for rec in records:
        seen[rec["group"]] += 1
        if seen[rec["group"]] <= limit:
            yield rec


def _groups_in_shard(path: Path) -> Counter:
    import tarfile

    with tarfile.open(path) as tf:
        members = [m for m in tf.getmembers() if m.name.endswith(".json")]
        return Counter(json.load(tf.extractfile(m))["group"] for m in members)


def _say(progress: bool, text: str) -> None:
    if progress:
        print(text, flush=True)


def format_table(stats: dict) -> str:
    """Split sizes of every built dataset, then skips by reason."""
    lines = [f"{'dataset':<24}{'train':>7}{'val':>7}{'test':>7}  shards"]
    for source, s in stats.items():
        for name, ds in s["datasets"].items():
            label = source if name == "." else f"{source}/{name}"
            n = {k: v["samples"] for k, v in ds["splits"].items()}
            pattern = ds["splits"].get("train", {}).get("pattern", "")
            sizes = "".join(f"{n.get(k, 0):>7}" for k in ("train", "val", "test"))
            lines.append(f"{label:<24}{sizes}  {pattern}")
    for source, s in stats.items():
        skips = ", ".join(f"{k} {v}" for k, v in s["skipped"].items()) or "none"
        lines.append(f"{source} skipped: {skips}")
    return "\n".join(lines)


def build_demo_data(out_dir: str | Path, *, which=SOURCES, image_size: int = 192, workers: int = 2,
                    limit: int | None = None, overwrite: bool = False, progress: bool = True,
                    svg_root: str | Path = DEFAULT_SVG_ROOT, textile_dir: str | Path | None = None) -> dict:
    """Build the offline demo datasets under out_dir (openclipart/, textile/); return {source: stats}.

    Shard specs for a config: out_dir/openclipart/domain/train-*.tar, .../general/test-*.tar,
    out_dir/textile/train-*.tar (exact brace patterns are in each stats.json).
    """
    which = (which,) if isinstance(which, str) else tuple(which)
    unknown = [w for w in which if w not in SOURCES]
    if unknown:
        raise ValueError(f"unknown demo dataset {unknown[0]!r}; choose from {', '.join(SOURCES)}")
    out_dir = Path(out_dir)
    stats = {}
    if "openclipart" in which:
        stats["openclipart"] = build_openclipart(
            out_dir / "openclipart", svg_root=svg_root, image_size=image_size, workers=workers, limit=limit,
            overwrite=overwrite, progress=progress)
    if "textile" in which:
        stats["textile"] = build_textile(out_dir / "textile", root=textile_dir, limit=limit,
                                         overwrite=overwrite, progress=progress)
    try:  # keep the stats of sources built by an earlier call
        previous = json.loads((out_dir / "stats.json").read_text())
    except (OSError, ValueError):
        previous = {}
    write_json(out_dir / "stats.json", {**previous, **stats})
    _say(progress, format_table(stats))
    return stats
