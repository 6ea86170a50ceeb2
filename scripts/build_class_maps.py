"""Build the checked-in ImageNet -> dataset class tables (`wsss/models/class_maps/*.json`) from WordNet 3.0.

Each ImageNet-1k class is a WordNet 3.0 noun synset (its id `n<offset>`, in index order in timm's
`imagenet_synsets.txt`). A dataset class is given as one or more root synsets (`lemma.n.NN`: the NN-th sense
of the lemma in WordNet's `index.noun`, or a WordNet id `n<offset>`; `-` before one excludes what lies below
it); its ImageNet classes are those whose synset is a root or lies below
one through hypernym links (`@`, and `@i` for instances). A class with no root, or whose roots reach no ImageNet
class, is listed under `unmapped` and left out of the score (`dataset.void_classes`).

WordNet's database comes from Debian's `wordnet-base` (`apt-get install wordnet-base`, files under
/usr/share/wordnet); nothing of it is needed at run time, only the JSON this writes:

    python scripts/build_class_maps.py [--wordnet /usr/share/wordnet] [--check]

`--check` rebuilds in memory and fails when the checked-in tables differ (a test runs it where WordNet is
installed).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "wsss" / "models" / "class_maps"

# Roots per class. None: no clean ImageNet counterpart (named in `unmapped`, with the reason).
VOC: dict[str, list[str] | str] = {
    "aeroplane": ["airplane.n.01", "airliner.n.01", "warplane.n.01"],
    "bicycle": ["bicycle.n.01"],
    "bird": ["bird.n.01"],
    "boat": ["boat.n.01", "ship.n.01"],
    "bottle": ["bottle.n.01"],
    "bus": ["bus.n.01"],
    "car": ["car.n.01"],
    "cat": ["domestic_cat.n.01"],
    "chair": ["chair.n.01"],
    "cow": ["cattle.n.01"],
    "diningtable": ["dining_table.n.01"],
    "dog": ["dog.n.01"],
    "horse": ["horse.n.01"],
    "motorbike": ["motorcycle.n.01", "minibike.n.01", "n03791053"],  # + motor scooter
    "person": "ImageNet has no person class (only a few roles: scuba diver, groom, ballplayer)",
    "pottedplant": "ImageNet's 'pot, flowerpot' is the container, and it has no houseplant class",
    "sheep": ["sheep.n.01"],
    "sofa": ["sofa.n.01", "studio_couch.n.01"],
    "train": ["train.n.01", "locomotive.n.01", "passenger_car.n.01", "freight_car.n.01", "streetcar.n.01"],
    "tvmonitor": ["n04404412", "n03782006", "n04152593"],  # television, monitor, screen (CRT)
}

COCO: dict[str, list[str] | str] = {
    "person": "ImageNet has no person class (only a few roles: scuba diver, groom, ballplayer)",
    "bicycle": ["bicycle.n.01"],
    "car": ["car.n.01"],
    "motorcycle": ["motorcycle.n.01", "minibike.n.01", "n03791053"],  # + motor scooter
    "airplane": ["airplane.n.01", "airliner.n.01", "warplane.n.01"],
    "bus": ["bus.n.01"],
    "train": ["train.n.01", "locomotive.n.01", "passenger_car.n.01", "freight_car.n.01", "streetcar.n.01"],
    "truck": ["truck.n.01", "-n03770679"],  # a minivan is a car (VOC and COCO alike)
    "boat": ["boat.n.01", "ship.n.01"],
    "traffic light": ["traffic_light.n.01"],
    "fire hydrant": "ImageNet-1k has no fire hydrant class",
    "stop sign": "ImageNet's 'street sign' covers every sign, not stop signs",
    "parking meter": ["parking_meter.n.01"],
    "bench": ["park_bench.n.01"],
    "bird": ["bird.n.01"],
    "cat": ["domestic_cat.n.01"],
    "dog": ["dog.n.01"],
    "horse": ["horse.n.01"],
    "sheep": ["sheep.n.01"],
    "cow": ["cattle.n.01"],
    "elephant": ["elephant.n.01"],
    "bear": ["bear.n.01"],
    "zebra": ["zebra.n.01"],
    "giraffe": "ImageNet-1k has no giraffe class",
    "backpack": ["backpack.n.01"],
    "umbrella": ["umbrella.n.01"],
    "handbag": ["n04026417"],  # purse
    "tie": ["bow_tie.n.01", "windsor_tie.n.01"],
    "suitcase": "ImageNet-1k has no suitcase class",
    "frisbee": "ImageNet-1k has no frisbee class",
    "skis": ["ski.n.01"],
    "snowboard": "ImageNet-1k has no snowboard class",
    "sports ball": ["ball.n.01", "-n04023962"],  # not the punching bag
    "kite": "ImageNet's 'kite' is the bird of prey",
    "baseball bat": "ImageNet-1k has no bat (club) class",
    "baseball glove": "ImageNet-1k has no baseball glove class",
    "skateboard": "ImageNet-1k has no skateboard class",
    "surfboard": "ImageNet-1k has no surfboard class",
    "tennis racket": ["racket.n.04"],
    "bottle": ["bottle.n.01"],
    "wine glass": "ImageNet-1k has no wine glass class (only red wine, the drink)",
    "cup": ["cup.n.01", "coffee_mug.n.01"],
    "fork": "ImageNet-1k has no fork class",
    "knife": ["cleaver.n.01", "letter_opener.n.01"],
    "spoon": ["wooden_spoon.n.02"],
    "bowl": ["mixing_bowl.n.01", "soup_bowl.n.01"],
    "banana": ["banana.n.02"],
    "apple": ["granny_smith.n.01"],
    "sandwich": ["cheeseburger.n.01"],
    "orange": ["orange.n.01"],
    "broccoli": ["broccoli.n.02"],
    "carrot": "ImageNet-1k has no carrot class",
    "hot dog": ["hotdog.n.02"],
    "pizza": ["pizza.n.01"],
    "donut": "ImageNet-1k has no doughnut class",
    "cake": ["trifle.n.01"],
    "chair": ["chair.n.01"],
    "couch": ["sofa.n.01", "studio_couch.n.01"],
    "potted plant": "ImageNet's 'pot, flowerpot' is the container, and it has no houseplant class",
    "bed": ["bed.n.01"],
    "dining table": ["dining_table.n.01"],
    "toilet": ["toilet_seat.n.01"],
    "tv": ["n04404412", "n03782006", "n04152593"],  # television, monitor, screen (CRT)
    "laptop": ["laptop.n.01", "notebook.n.02"],
    "mouse": ["mouse.n.04"],
    "remote": ["remote_control.n.01"],
    "keyboard": ["computer_keyboard.n.01"],
    "cell phone": ["cellular_telephone.n.01"],
    "microwave": ["microwave.n.02"],
    "oven": ["dutch_oven.n.02", "rotisserie.n.01"],
    "toaster": ["toaster.n.02"],
    "sink": ["n04553703"],  # washbasin
    "refrigerator": ["n04070727"],
    "book": ["book_jacket.n.01"],
    "clock": ["clock.n.01"],
    "vase": ["vase.n.01"],
    "scissors": "ImageNet-1k has no scissors class",
    "teddy bear": ["teddy.n.01"],
    "hair drier": ["hand_blower.n.01"],
    "toothbrush": "ImageNet-1k has no toothbrush class",
}


def read_wordnet(root: Path) -> tuple[dict[int, list[int]], dict[int, str], dict[str, list[int]]]:
    """WordNet's nouns: hypernyms of each synset offset, its first lemma, and the senses of each lemma."""
    hypernyms: dict[int, list[int]] = {}
    lemma: dict[int, str] = {}
    for line in (root / "data.noun").read_text(encoding="latin-1").splitlines():
        if line.startswith(" "):
            continue  # the licence header
        fields = line.split(" | ")[0].split()
        offset, words = int(fields[0]), int(fields[3], 16)
        lemma[offset] = fields[4]
        at = 4 + 2 * words
        pointers = int(fields[at])
        ups = []
        for p in range(pointers):
            symbol, target, pos = fields[at + 1 + 4 * p : at + 4 + 4 * p]
            if symbol in ("@", "@i") and pos == "n":
                ups.append(int(target))
        hypernyms[offset] = ups
    senses: dict[str, list[int]] = {}
    for line in (root / "index.noun").read_text(encoding="latin-1").splitlines():
        if line.startswith(" "):
            continue
        f = line.split()
        count, pointer_kinds = int(f[2]), int(f[3])
        senses[f[0]] = [int(x) for x in f[6 + pointer_kinds :][:count]]
    return hypernyms, lemma, senses


def ancestors(offset: int, hypernyms: dict[int, list[int]]) -> set[int]:
    """The synset and every synset above it."""
    seen, todo = set(), [offset]
    while todo:
        s = todo.pop()
        if s not in seen:
            seen.add(s)
            todo.extend(hypernyms.get(s, []))
    return seen


def resolve(name: str, senses: dict[str, list[int]]) -> int:
    """`lemma.n.NN` -> the offset of the lemma's NN-th noun sense."""
    if re.fullmatch(r"n\d{8}", name):  # a WordNet id as ImageNet writes it
        return int(name[1:])
    word, pos, number = name.rsplit(".", 2)
    if pos != "n" or word not in senses or not 1 <= int(number) <= len(senses[word]):
        raise KeyError(f"{name}: not a WordNet 3.0 noun sense")
    return senses[word][int(number) - 1]


def build(table: dict[str, list[str] | str], wordnet: Path, synsets: list[str], dataset: str) -> dict:
    hypernyms, lemma, senses = read_wordnet(wordnet)
    above = [ancestors(int(s[1:]), hypernyms) for s in synsets]
    classes, unmapped = {}, {}
    for name, roots in table.items():
        if isinstance(roots, str):
            unmapped[name] = roots
            continue
        offsets = {resolve(r, senses) for r in roots if not r.startswith("-")}
        excluded = {resolve(r[1:], senses) for r in roots if r.startswith("-")}
        members = [i for i, up in enumerate(above) if up & offsets and not up & excluded]
        if not members:
            unmapped[name] = f"its roots {roots} reach no ImageNet class"
            continue
        classes[name] = {
            "roots": roots,
            "imagenet": members,
            "imagenet_names": [lemma[int(synsets[i][1:])] for i in members],
        }
    taken: dict[int, list[str]] = {}
    for name, c in classes.items():
        for i in c["imagenet"]:
            taken.setdefault(i, []).append(name)
    shared = {i: names for i, names in taken.items() if len(names) > 1}
    if shared:
        raise ValueError(f"{dataset}: ImageNet classes under more than one class: {shared}")
    return {
        "dataset": dataset,
        "source": "WordNet 3.0 hyponyms of each class's roots (scripts/build_class_maps.py)",
        "classes": classes,
        "unmapped": unmapped,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wordnet", type=Path, default=Path("/usr/share/wordnet"))
    parser.add_argument("--check", action="store_true", help="fail when the checked-in tables differ")
    args = parser.parse_args()
    from timm.data import ImageNetInfo

    synsets = ImageNetInfo().label_names()  # the 1,000 WordNet ids in index order
    stale = []
    for name, dataset, table in (("imagenet_to_voc", "voc12", VOC), ("imagenet_to_coco", "coco", COCO)):
        text = json.dumps(build(table, args.wordnet, synsets, dataset), indent=1) + "\n"
        path = OUT / f"{name}.json"
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.write_text(text)
            n = sum(len(c["imagenet"]) for c in json.loads(text)["classes"].values())
            print(f"{path}: {n} ImageNet classes")
    if stale:
        print(f"stale: {stale}; rerun python scripts/build_class_maps.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
