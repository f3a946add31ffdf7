"""The embedded offline demo: eight look-alike North-American birds, drawn procedurally.

Every `make` target and most tests need a dataset that exists without downloads, keys or network. This
source ships it: four pairs of real species that differ in a few visible traits (throat, wing pattern,
underparts, eyebrow), with bundled descriptions and attributes we wrote ourselves, and images rendered
on the fly from each species' plumage. The pairs share a coarse label, so a model must read the
distinguishing traits to get the fine label right, which is exactly what FINER probes.

Images are adult males in breeding plumage (the plumage the required attributes describe). Each image is
seeded by (seed, concept, split, index): the same seed renders byte-identical files, any other index a
different pose, background and noise.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from finer.errors import FinerError
from finer.schema import Attributes, Concept, Knowledge

from .base import ImageRecord, Source, SourceTerms

#: Images per species in each split, in split order.
SPLIT_SIZES: dict[str, int] = {"train": 24, "test": 8}
#: Side of the square images in pixels.
IMAGE_SIZE = 192
#: Drawing happens at this multiple of `IMAGE_SIZE` and is box-filtered down: cheap anti-aliasing.
SUPERSAMPLE = 2
#: Small files; saved with full-resolution chroma so thin coloured bands and bars survive.
JPEG_QUALITY = 90

RGB = tuple[int, int, int]
WHITE: RGB = (245, 245, 242)
BLACK: RGB = (22, 22, 26)


@dataclass(frozen=True)
class Plumage:
    """The colours the renderer paints; `None` means the species lacks that trait."""

    crown: RGB
    cheek: RGB
    throat: RGB
    back: RGB
    belly: RGB
    wing: RGB
    tail: RGB
    beak: RGB
    beak_size: float = 1.0
    flanks: RGB | None = None
    flank_streaks: RGB | None = None
    breast_band: RGB | None = None
    eyebrow: RGB | None = None
    eye_line: RGB | None = None
    shoulder: RGB | None = None
    wing_bars: int = 0
    wing_patch: RGB | None = None
    wing_edges: RGB | None = None


@dataclass(frozen=True)
class Species:
    """One demo concept: labels, bundled knowledge and the plumage its images are drawn from."""

    concept_id: str
    common: str
    binomial: str
    group: str
    family: str
    description: str
    required: tuple[str, ...]
    likely: tuple[str, ...]
    plumage: Plumage


SPECIES: tuple[Species, ...] = (
    Species(
        concept_id="black-throated-blue-warbler",
        common="Black-throated Blue Warbler",
        binomial="Setophaga caerulescens",
        group="Warbler",
        family="Parulidae",
        description=(
            "The Black-throated Blue Warbler is a small wood-warbler that breeds in mature deciduous and "
            "mixed forests with a dense understory in northeastern North America and along the "
            "Appalachians, and winters in the Greater Antilles. The adult male is deep blue above, with a "
            "black face, throat and flanks and a clean white belly. A small white square at the base of "
            "the primaries shows on the folded wing, and birders call it the pocket handkerchief. The "
            "female is plain olive-brown with a pale eyebrow and usually a small pale wing spot, so the "
            "two sexes look like different species."
        ),
        required=(
            "deep blue upperparts",
            "black face",
            "black throat",
            "black flanks",
            "white belly",
            "white wing patch",
        ),
        likely=("thin dark bill", "dark blue tail", "olive-brown female with pale eyebrow"),
        plumage=Plumage(
            crown=(32, 58, 130),
            cheek=BLACK,
            throat=BLACK,
            back=(32, 58, 130),
            belly=WHITE,
            wing=(28, 44, 96),
            tail=(28, 44, 96),
            beak=BLACK,
            beak_size=0.8,
            flanks=BLACK,
            wing_patch=WHITE,
        ),
    ),
    Species(
        concept_id="cerulean-warbler",
        common="Cerulean Warbler",
        binomial="Setophaga cerulea",
        group="Warbler",
        family="Parulidae",
        description=(
            "The Cerulean Warbler is a small wood-warbler that breeds high in the canopy of tall deciduous "
            "forests in eastern North America and winters on the Andean slopes of northern South America. "
            "The adult male is sky blue above and white below, with a white throat, a narrow dark "
            "blue-black band across the breast and dark streaks along the flanks. It shows two bold white "
            "wing bars and a dark line behind the eye. Because it forages so high it is heard more often "
            "than seen, and its numbers have fallen sharply in recent decades."
        ),
        required=(
            "sky-blue upperparts",
            "white throat",
            "narrow dark breast band",
            "two white wing bars",
            "white underparts",
            "dark streaks on flanks",
        ),
        likely=("black streaks on back", "dark line behind the eye", "turquoise female with pale eyebrow"),
        plumage=Plumage(
            crown=(96, 160, 220),
            cheek=(96, 160, 220),
            throat=WHITE,
            back=(96, 160, 220),
            belly=WHITE,
            wing=(52, 88, 138),
            tail=(52, 88, 138),
            beak=BLACK,
            beak_size=0.8,
            flank_streaks=(30, 44, 84),
            breast_band=(24, 34, 70),
            eye_line=(30, 44, 84),
            wing_bars=2,
        ),
    ),
    Species(
        concept_id="baltimore-oriole",
        common="Baltimore Oriole",
        binomial="Icterus galbula",
        group="Oriole",
        family="Icteridae",
        description=(
            "The Baltimore Oriole is a medium-sized blackbird relative that breeds in open woodland, parks "
            "and riversides across eastern and central North America and winters from Mexico to northern "
            "South America. The adult male has a black head, back and wings, with bright flame-orange "
            "underparts, rump and shoulders, a white wing bar and orange outer tail feathers. Females are "
            "duller, yellow-orange below and olive-brown above with two white wing bars. It weaves a deep "
            "hanging pouch of plant fibres near the end of a high branch."
        ),
        required=(
            "black head",
            "black back",
            "bright orange underparts",
            "orange shoulder patch",
            "white wing bar",
            "black wings",
        ),
        likely=("orange outer tail feathers", "orange rump", "slender blue-grey bill"),
        plumage=Plumage(
            crown=BLACK,
            cheek=BLACK,
            throat=BLACK,
            back=BLACK,
            belly=(255, 138, 20),
            wing=(30, 30, 34),
            tail=BLACK,
            beak=(120, 130, 150),
            beak_size=1.05,
            shoulder=(255, 138, 20),
            wing_bars=1,
        ),
    ),
    Species(
        concept_id="orchard-oriole",
        common="Orchard Oriole",
        binomial="Icterus spurius",
        group="Oriole",
        family="Icteridae",
        description=(
            "The Orchard Oriole is the smallest oriole of North America, breeding in open woods, orchards "
            "and shade trees of the eastern and central United States and wintering from Mexico to "
            "northern South America. The adult male has a black hood, back, wings and tail, and deep "
            "chestnut underparts, rump and shoulders, much darker than the orange of the Baltimore Oriole. "
            "A single white wing bar crosses the black wing. Females are yellow-green with two white wing "
            "bars, and first-year males look like females with a black bib."
        ),
        required=(
            "black head",
            "black back",
            "chestnut underparts",
            "chestnut shoulder patch",
            "white wing bar",
            "black wings",
        ),
        likely=("chestnut rump", "black tail", "yellow-green female with two wing bars"),
        plumage=Plumage(
            crown=BLACK,
            cheek=BLACK,
            throat=BLACK,
            back=BLACK,
            belly=(128, 44, 22),
            wing=(30, 30, 34),
            tail=BLACK,
            beak=(120, 130, 150),
            beak_size=0.95,
            shoulder=(128, 44, 22),
            wing_bars=1,
        ),
    ),
    Species(
        concept_id="scarlet-tanager",
        common="Scarlet Tanager",
        binomial="Piranga olivacea",
        group="Tanager",
        family="Cardinalidae",
        description=(
            "The Scarlet Tanager is a medium-sized songbird of the cardinal family that breeds in mature "
            "deciduous forests, often oak woods, of eastern North America and winters in northwestern "
            "South America. The breeding male is brilliant scarlet with jet-black wings and tail, a "
            "contrast no other North American red bird shows. Females are yellow-olive with darker wings, "
            "and after breeding the male moults into a similar yellow-green plumage but keeps black wings. "
            "It spends most of its time high in the canopy, where its hoarse, robin-like song gives it away."
        ),
        required=("scarlet red body", "black wings", "black tail", "red head"),
        likely=("pale thick bill", "yellow-green plumage outside breeding season", "dark eyes"),
        plumage=Plumage(
            crown=(226, 22, 30),
            cheek=(226, 22, 30),
            throat=(226, 22, 30),
            back=(226, 22, 30),
            belly=(232, 30, 36),
            wing=BLACK,
            tail=BLACK,
            beak=(190, 185, 165),
            beak_size=1.2,
        ),
    ),
    Species(
        concept_id="summer-tanager",
        common="Summer Tanager",
        binomial="Piranga rubra",
        group="Tanager",
        family="Cardinalidae",
        description=(
            "The Summer Tanager is a medium-sized songbird of the cardinal family that breeds in open "
            "woodland of the southern and eastern United States and in riverside groves of the Southwest, "
            "and winters from Mexico to South America. The adult male is the only entirely red bird of "
            "North America: head, body, wings and tail are all rose red, the wings only a shade darker. "
            "Females are mustard yellow to orange. Both sexes have a large pale bill, and the species is "
            "known for catching bees and wasps in flight and rubbing off their stings before eating them."
        ),
        required=("entirely rose-red plumage", "red wings", "red tail", "large pale bill"),
        likely=("slightly darker wing feathers", "slight crest on the head", "mustard-yellow female"),
        plumage=Plumage(
            crown=(206, 52, 72),
            cheek=(206, 52, 72),
            throat=(212, 58, 78),
            back=(200, 50, 70),
            belly=(214, 64, 82),
            wing=(170, 38, 58),
            tail=(182, 44, 62),
            beak=(226, 206, 150),
            beak_size=1.35,
        ),
    ),
    Species(
        concept_id="black-capped-chickadee",
        common="Black-capped Chickadee",
        binomial="Poecile atricapillus",
        group="Chickadee",
        family="Paridae",
        description=(
            "The Black-capped Chickadee is a small, non-migratory songbird of deciduous and mixed woods "
            "across Canada, Alaska and the northern United States, and a regular visitor to feeders. It has "
            "a solid black cap and bib, white cheeks, a grey back and tail, whitish underparts with buff "
            "flanks, and white edges on the wing feathers that form a pale panel. Its call is the familiar "
            "chick-a-dee-dee-dee and its song a clear two-note whistle. In autumn it hides seeds and "
            "insects in many separate places and finds them again weeks later."
        ),
        required=("black cap", "black bib", "white cheeks", "grey back", "buff flanks", "white-edged wing"),
        likely=("whitish belly", "short black bill", "long grey tail"),
        plumage=Plumage(
            crown=BLACK,
            cheek=WHITE,
            throat=BLACK,
            back=(132, 138, 144),
            belly=(236, 234, 226),
            wing=(110, 116, 124),
            tail=(110, 116, 124),
            beak=BLACK,
            beak_size=0.7,
            flanks=(226, 180, 128),
            wing_edges=WHITE,
        ),
    ),
    Species(
        concept_id="mountain-chickadee",
        common="Mountain Chickadee",
        binomial="Poecile gambeli",
        group="Chickadee",
        family="Paridae",
        description=(
            "The Mountain Chickadee is a small, mostly resident songbird of the coniferous mountain forests "
            "of western North America, from the Rockies to the Sierra Nevada and the Cascades. It looks "
            "like a Black-capped Chickadee with a black cap and bib and white cheeks, but a white eyebrow "
            "stripe cuts through the black cap above the eye. Its flanks and back are plain grey, without "
            "the buff wash of its eastern relative. The eyebrow can wear thin by late summer, and in "
            "winter some birds move down to lower elevations."
        ),
        required=(
            "black cap",
            "white eyebrow stripe",
            "black bib",
            "white cheeks",
            "grey back",
            "grey flanks",
        ),
        likely=("pale grey underparts", "short black bill", "long grey tail"),
        plumage=Plumage(
            crown=BLACK,
            cheek=WHITE,
            throat=BLACK,
            back=(128, 132, 136),
            belly=(214, 214, 210),
            wing=(112, 116, 122),
            tail=(112, 116, 122),
            beak=BLACK,
            beak_size=0.7,
            flanks=(160, 162, 162),
            eyebrow=WHITE,
            eye_line=BLACK,
        ),
    ),
)


class DemoSource(Source):
    """Eight look-alike birds in four pairs, rendered in memory: no files, no network, no `--root`."""

    name = "demo"
    layout = "nothing on disk: the demo renders its images in memory (no --root needed)"
    bundled_knowledge = True
    terms = SourceTerms(
        title="finer demo birds",
        homepage="",
        license="apache-2.0",
        license_name="",
        license_link="",
        summary=(
            "Images drawn procedurally by finer's demo source and descriptions written for it: "
            "Apache-2.0, like the toolkit."
        ),
        confirmed=True,
        images_redistributable=True,
        citation="",
    )

    def __init__(self, root: Path | None = None, seed: int = 0) -> None:
        # `root` is accepted so the engine can construct every source alike; the demo has nothing to read.
        if seed < 0:
            raise FinerError(f"demo: seed must be a non-negative integer, got {seed}")
        self.root = None
        self.seed = seed

    def splits(self) -> list[str]:
        return list(SPLIT_SIZES)

    def concepts(self) -> list[Concept]:
        return [_concept(species) for species in SPECIES]

    def records(self, split: str) -> Iterator[ImageRecord]:
        """Checks `split` now, not at the first `next`, then renders one image per record as it is read."""
        if split not in SPLIT_SIZES:
            raise FinerError(f"demo: unknown split {split!r}; choose one of: {', '.join(SPLIT_SIZES)}")
        return self._stream(split)

    def _stream(self, split: str) -> Iterator[ImageRecord]:
        for species in SPECIES:
            for index in range(SPLIT_SIZES[split]):
                data, bbox = render(species, _rng(self.seed, species.concept_id, split, index))
                yield ImageRecord(
                    image_id=f"{species.concept_id}/{split}/{index:03d}",
                    concept_id=species.concept_id,
                    data=data,
                    bbox=bbox,
                )


def _concept(species: Species) -> Concept:
    """A fresh `Concept` per call, so a caller that edits one cannot change the next build."""
    genus = species.binomial.split()[0]
    return Concept(
        concept_id=species.concept_id,
        fine=[species.common, species.binomial],
        superordinate="Bird",
        coarse=[species.group, species.family],
        coarse_source="taxonomy",
        # No species key: the knowledge probe shows the taxonomy, which must not give the answer away.
        taxonomy={"order": "Passeriformes", "family": species.family, "genus": genus},
        knowledge=Knowledge(
            text=species.description, status="bundled", title=species.common, section="Description"
        ),
        attributes=Attributes(
            required=list(species.required), likely=list(species.likely), extractor="bundled"
        ),
    )


def _rng(seed: int, concept_id: str, split: str, index: int) -> np.random.Generator:
    """A generator keyed by names, not positions, so adding a species or split never moves the others."""
    key = int.from_bytes(hashlib.sha256(f"{concept_id}/{split}".encode()).digest()[:8], "big")
    return np.random.default_rng([seed, key, index])


# Rendering. The bird is drawn in its own coordinates (about one unit from tail to beak, facing +x, y
# down, perched with the front raised), then mapped to the canvas by one random affine pose. Regions of a
# part (throat, wing bars, ...) are polygons clipped to that part's mask, so patches never spill outside.

Points = np.ndarray  # (n, 2) float


def _ellipse(cx: float, cy: float, rx: float, ry: float, angle: float = 0.0, n: int = 40) -> Points:
    t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    x, y = rx * np.cos(t), ry * np.sin(t)
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return np.stack([cx + x * c - y * s, cy + x * s + y * c], axis=1)


def _band(p0: tuple[float, float], p1: tuple[float, float], width: float) -> Points:
    """A quadrilateral of `width` around the segment p0-p1 (stripes, bars, legs, the perch)."""
    a, b = np.asarray(p0, float), np.asarray(p1, float)
    d = b - a
    normal = np.array([-d[1], d[0]]) / np.hypot(*d) * width / 2
    return np.stack([a + normal, b + normal, b - normal, a - normal])


# Bird parts in bird coordinates.
BODY = _ellipse(0.0, 0.0, 0.34, 0.21, -30)
HEAD = _ellipse(0.30, -0.30, 0.15, 0.15)
TAIL = np.array([(-0.16, 0.06), (-0.50, 0.44), (-0.42, 0.50), (-0.08, 0.16)])
WING_CENTER, WING_RX, WING_RY, WING_ANGLE = (-0.07, -0.02), 0.27, 0.10, -36.0
WING = _ellipse(*WING_CENTER, WING_RX, WING_RY, WING_ANGLE)
EYE = (0.37, -0.32)
AXIS = np.array([math.cos(math.radians(30)), -math.sin(math.radians(30))])
VENTRAL = np.array([-AXIS[1], AXIS[0]])
#: The belly side of the body axis, a little above it, as a polygon far larger than the bird.
BELLY = np.stack(
    [-0.02 * VENTRAL - 2 * AXIS, -0.02 * VENTRAL + 2 * AXIS, 2 * VENTRAL + 2 * AXIS, 2 * VENTRAL - 2 * AXIS]
)
FLANKS = _ellipse(-0.07, 0.11, 0.17, 0.085, -30)
CHEEK = _ellipse(0.29, -0.25, 0.13, 0.06)
THROAT = _ellipse(0.31, -0.13, 0.09, 0.09)
#: Everything but the beak, whose size is the species' own.
OUTLINE = np.concatenate([BODY, HEAD, TAIL, WING])


def _wing_point(t: float, across: float = 0.0) -> tuple[float, float]:
    """A point `t` of the way from the shoulder (0) to the wingtip (1), `across` toward the belly side."""
    c, s = math.cos(math.radians(WING_ANGLE)), math.sin(math.radians(WING_ANGLE))
    along = WING_RX * (1 - 2 * t)
    return (WING_CENTER[0] + along * c - across * s, WING_CENTER[1] + along * s + across * c)


def _wing_stripe(t: float, width: float) -> Points:
    """A bar across the wing at `t`."""
    return _band(_wing_point(t, -0.2), _wing_point(t, 0.2), width)


class _Canvas:
    """The supersampled image plus the bird pose; paints bird-space polygons, optionally clipped."""

    def __init__(self, image: Image.Image, matrix: np.ndarray, offset: np.ndarray) -> None:
        self.image = image
        self.draw = ImageDraw.Draw(image)
        self.matrix = matrix
        self.offset = offset

    def xy(self, points: Points) -> list[tuple[float, float]]:
        return [tuple(p) for p in points @ self.matrix.T + self.offset]

    def mask(self, points: Points) -> Image.Image:
        mask = Image.new("L", self.image.size, 0)
        ImageDraw.Draw(mask).polygon(self.xy(points), fill=255)
        return mask

    def paint(self, points: Points, colour: RGB, clip: Image.Image | None = None) -> None:
        """Fill a polygon; with `clip`, only where the clip mask is set (within the box both cover)."""
        if clip is None:
            self.draw.polygon(self.xy(points), fill=colour)
            return
        xy = points @ self.matrix.T + self.offset
        bounds = clip.getbbox()
        if bounds is None:
            return
        x0, y0 = np.maximum(np.floor(xy.min(axis=0)).astype(int), bounds[:2])
        x1, y1 = np.minimum(np.ceil(xy.max(axis=0)).astype(int) + 1, bounds[2:])
        if x0 >= x1 or y0 >= y1:
            return
        box = (int(x0), int(y0), int(x1), int(y1))
        mask = Image.new("L", (box[2] - box[0], box[3] - box[1]), 0)
        ImageDraw.Draw(mask).polygon([tuple(p) for p in xy - box[:2]], fill=255)
        self.image.paste(colour, box, ImageChops.multiply(mask, clip.crop(box)))


BACKGROUNDS: tuple[tuple[RGB, RGB], ...] = (
    ((110, 160, 215), (195, 218, 236)),  # clear sky
    ((176, 182, 190), (222, 224, 226)),  # overcast
    ((38, 78, 40), (104, 142, 72)),  # foliage
    ((70, 96, 52), (150, 160, 110)),  # sunlit leaves
)


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A vertical gradient with blurred leaves and light spots in the gradient's own hues.

    Drawn at output size and scaled up: it is blurred anyway, and blurring the supersampled canvas would
    cost about as much as drawing the whole bird.
    """
    small = IMAGE_SIZE
    top, bottom = (
        np.clip(np.array(c) + rng.integers(-18, 19, 3), 0, 255) for c in BACKGROUNDS[rng.integers(4)]
    )
    ramp = np.linspace(0.0, 1.0, small)[:, None, None]
    pixels = (top * (1 - ramp) + bottom * ramp) * np.ones((1, small, 1))
    image = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(6, 16)):
        base = top if rng.random() < 0.5 else bottom
        shade = base * rng.uniform(0.7, 1.25) + rng.integers(-8, 9, 3)
        colour = tuple(int(v) for v in np.clip(shade, 0, 255))
        cx, cy = rng.uniform(0, small, 2)
        rx = rng.uniform(0.03, 0.14) * small
        shape = _ellipse(cx, cy, rx, rx * rng.uniform(0.35, 1.0), rng.uniform(0, 180), n=24)
        draw.polygon([tuple(p) for p in shape], fill=colour)
    blurred = image.filter(ImageFilter.GaussianBlur(rng.uniform(1.5, 4.0)))
    return blurred.resize((size, size), Image.Resampling.BILINEAR)


def _pose(rng: np.random.Generator, size: int, outline: Points) -> tuple[np.ndarray, np.ndarray]:
    """A random mirror, tilt, scale and position that keeps the whole bird inside the frame."""
    angle = math.radians(rng.uniform(-10, 10))
    mirror = -1.0 if rng.random() < 0.5 else 1.0
    c, s = math.cos(angle), math.sin(angle)
    matrix = np.array([[c, -s], [s, c]]) @ np.diag([mirror, 1.0])
    extent = np.ptp(outline @ matrix.T, axis=0).max()
    matrix *= rng.uniform(0.55, 0.85) * size / extent
    placed = outline @ matrix.T
    low, high = placed.min(axis=0), placed.max(axis=0)
    margin = 0.04 * size
    offset = rng.uniform(margin - low, size - margin - high)
    return matrix, offset


def render(species: Species, rng: np.random.Generator) -> tuple[bytes, list[float]]:
    """One JPEG of `species` and the bird's box (x, y, w, h in pixels), all randomness from `rng`."""
    size = IMAGE_SIZE * SUPERSAMPLE
    image = _background(rng, size)
    plumage = species.plumage
    k = plumage.beak_size
    beak = np.array([(0.425, -0.30 - 0.035 * k), (0.425 + 0.11 * k, -0.285), (0.425, -0.30 + 0.035 * k)])
    outline = np.concatenate([OUTLINE, beak])
    matrix, offset = _pose(rng, size, outline)
    canvas = _Canvas(image, matrix, offset)
    light = rng.uniform(0.88, 1.08)

    def tone(colour: RGB) -> RGB:
        jitter = rng.integers(-6, 7, 3)
        return tuple(int(v) for v in np.clip(np.array(colour) * light + jitter, 0, 255))

    # Perch and legs first, so the body hides where they meet it.
    perch = rng.uniform(-0.15, 0.15)
    canvas.paint(_band((-4.0, 0.31 - perch * 4), (4.0, 0.31 + perch * 4), 0.05), tone((92, 66, 44)))
    for x in (-0.02, 0.06):
        canvas.paint(_band((x, 0.15), (x + 0.01, 0.31), 0.018), tone((60, 56, 54)))
    canvas.paint(TAIL, tone(plumage.tail))

    silhouette = ImageChops.lighter(canvas.mask(BODY), canvas.mask(HEAD))
    canvas.paint(np.concatenate([BODY, HEAD]), tone(plumage.back), silhouette)
    canvas.paint(BELLY, tone(plumage.belly), silhouette)
    if plumage.flanks:
        canvas.paint(FLANKS, tone(plumage.flanks), silhouette)
    if plumage.flank_streaks:
        streak = tone(plumage.flank_streaks)
        for dx, dy in ((-0.16, 0.06), (-0.08, 0.11), (0.0, 0.13), (-0.12, 0.15), (0.06, 0.08)):
            canvas.paint(_band((dx, dy), (dx + 0.08, dy - 0.045), 0.022), streak, silhouette)
    canvas.paint(HEAD, tone(plumage.crown), silhouette)
    canvas.paint(CHEEK, tone(plumage.cheek), silhouette)
    canvas.paint(THROAT, tone(plumage.throat), silhouette)
    if plumage.breast_band:
        canvas.paint(_band((0.06, -0.02), (0.46, -0.06), 0.045), tone(plumage.breast_band), silhouette)
    if plumage.eyebrow:
        canvas.paint(_band((0.20, -0.375), (0.45, -0.37), 0.045), tone(plumage.eyebrow), silhouette)
    if plumage.eye_line:
        canvas.paint(_band((0.18, -0.315), (0.42, -0.32), 0.03), tone(plumage.eye_line), silhouette)

    wing = canvas.mask(WING)
    canvas.paint(WING, tone(plumage.wing), wing)
    if plumage.shoulder:
        canvas.paint(_ellipse(*_wing_point(0.08), 0.09, 0.09), tone(plumage.shoulder), wing)
    if plumage.wing_edges:
        for across in (0.025, 0.055):
            edge = _band(_wing_point(0.3, across), _wing_point(0.95, across), 0.018)
            canvas.paint(edge, tone(plumage.wing_edges), wing)
    for t in (0.30, 0.46)[: plumage.wing_bars]:
        canvas.paint(_wing_stripe(t, 0.04), tone(WHITE), wing)
    if plumage.wing_patch:
        patch = _band(_wing_point(0.52, 0.035), _wing_point(0.64, 0.035), 0.07)
        canvas.paint(patch, tone(plumage.wing_patch), wing)

    canvas.paint(beak, tone(plumage.beak))
    canvas.paint(_ellipse(*EYE, 0.03, 0.03, n=16), (10, 10, 10))
    canvas.paint(_ellipse(EYE[0] + 0.008, EYE[1] - 0.01, 0.009, 0.009, n=8), (230, 230, 230))

    small = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    noisy = np.asarray(small, float) + rng.normal(0.0, rng.uniform(2.0, 6.0), (IMAGE_SIZE, IMAGE_SIZE, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(
        out, "JPEG", quality=JPEG_QUALITY, subsampling=0
    )
    corners = outline @ matrix.T + offset
    x0, y0 = corners.min(axis=0) / SUPERSAMPLE
    x1, y1 = corners.max(axis=0) / SUPERSAMPLE
    return out.getvalue(), [round(float(v), 1) for v in (x0, y0, x1 - x0, y1 - y0)]
