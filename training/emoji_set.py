"""The emoji subset emoji64 is trained on: 320 single-code-point emoji from Noto Color Emoji.

How the list was chosen (once, then frozen here so it never depends on the machine):
  1. every code point in the emoji blocks (U+1F300-1F5FF, 1F600-1F64F, 1F680-1F6FF, 1F900-1F9FF,
     1FA70-1FAFF, 2600-27BF, 2B00-2BFF) that has a ``unicodedata`` name and renders non-blank with
     Debian's fonts-noto-color-emoji;
  2. dropped by name: symbols, signs, arrows, flags, keycaps, people and body parts, skin-tone
     modifiers, clock faces, coloured circles/squares/hearts, and the near-identical yellow faces;
  3. dropped glyphs covering < 20% of their box (too small to read at 64 px);
  4. dropped near-duplicates (mean |difference| < 0.06 at 24 px on grey), then removed the member of
     the closest remaining pair until 320 were left: the set is as visually distinct as possible, so
     a small judge can tell them apart at 32 px.

Names are ``unicodedata.name(char).lower()``. ``SYNONYMS`` gives other words for some emoji: the
first synonym appears in training captions, the others are held out (they test whether the text
encoder carries the generator to words it never saw with that emoji).
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field

CODEPOINTS = [
    int(h, 16)
    for h in """
    1F300 1F301 1F308 1F30A 1F30B 1F310 1F31E 1F31F 1F320 1F327 1F32A 1F32C
    1F32E 1F32F 1F330 1F332 1F336 1F33A 1F33B 1F33F 1F341 1F345 1F347 1F34C
    1F34F 1F351 1F352 1F353 1F354 1F355 1F359 1F35A 1F35C 1F35D 1F35E 1F35F
    1F360 1F363 1F364 1F367 1F369 1F36A 1F36B 1F36C 1F36D 1F36E 1F36F 1F370
    1F371 1F373 1F378 1F37A 1F37B 1F37F 1F381 1F382 1F383 1F386 1F389 1F38A
    1F392 1F3A0 1F3A1 1F3A2 1F3A5 1F3A8 1F3AB 1F3AC 1F3AD 1F3AF 1F3B0 1F3B1
    1F3B2 1F3B3 1F3B7 1F3B9 1F3BD 1F3BF 1F3C0 1F3C6 1F3CD 1F3D0 1F3D1 1F3D4
    1F3D5 1F3D6 1F3DC 1F3DD 1F3DE 1F3E1 1F3F0 1F404 1F405 1F408 1F40C 1F40F
    1F411 1F413 1F414 1F415 1F41B 1F41D 1F41E 1F420 1F423 1F426 1F427 1F428
    1F429 1F42A 1F42C 1F436 1F438 1F439 1F43A 1F43C 1F451 1F452 1F454 1F458
    1F459 1F45B 1F45C 1F45F 1F460 1F47B 1F47D 1F47F 1F480 1F488 1F48A 1F490
    1F492 1F4A1 1F4A7 1F4A9 1F4AA 1F4B0 1F4B8 1F4BA 1F4BE 1F4CA 1F4CF 1F4D0
    1F4DC 1F4E0 1F4E6 1F4EE 1F4F1 1F4F7 1F4FB 1F50B 1F50F 1F510 1F511 1F512
    1F514 1F525 1F529 1F52B 1F52E 1F576 1F579 1F5A8 1F5FA 1F5FB 1F5FF 1F607
    1F60E 1F680 1F681 1F682 1F68A 1F68C 1F691 1F692 1F693 1F695 1F699 1F69A
    1F69B 1F69C 1F6A2 1F6A3 1F6A4 1F6A5 1F6BD 1F6BE 1F6C0 1F6CB 1F6CD 1F6D7
    1F6DF 1F6E2 1F6F0 1F6F3 1F6F5 1F6FA 1F6FB 1F6FC 1F913 1F915 1F916 1F917
    1F920 1F921 1F922 1F92F 1F93F 1F941 1F942 1F943 1F945 1F94A 1F94B 1F94C
    1F94E 1F950 1F951 1F957 1F959 1F95D 1F95E 1F95F 1F960 1F961 1F965 1F966
    1F968 1F969 1F96A 1F96B 1F96C 1F96D 1F96F 1F973 1F975 1F97B 1F97C 1F97D
    1F980 1F983 1F984 1F985 1F989 1F98A 1F990 1F993 1F995 1F99A 1F99C 1F99E
    1F9A0 1F9A2 1F9A8 1F9AD 1F9C0 1F9C1 1F9C3 1F9C6 1F9C8 1F9CA 1F9CC 1F9D0
    1F9E5 1F9E6 1F9E7 1F9E8 1F9E9 1F9EA 1F9EC 1F9ED 1F9EE 1F9EF 1F9F0 1F9F1
    1F9F2 1F9F5 1F9F6 1F9FA 1F9FB 1FA70 1FA73 1FA7A 1FA80 1FA81 1FA82 1FA83
    1FA85 1FA86 1FA93 1FA94 1FA98 1FA99 1FA9F 1FAA2 1FAA3 1FAA9 1FAB4 1FAB8
    1FAD0 1FAD2 1FAD3 1FAD5 1FAD8 1FAD9 2601 2602 2603 2615 2668 26BD
    26BE 26F2 26F5 26F8 26FD 2708 2709 2744

""".split()
]

SYNONYMS = {
    "cat": ["kitty", "kitten"],
    "dog": ["doggy", "hound"],
    "dog face": ["puppy face", "pup"],
    "cow": ["cattle", "bovine"],
    "tiger": ["big cat", "striped cat"],
    "sheep": ["lamb", "ewe"],
    "ram": ["male sheep"],
    "rooster": ["cockerel", "male chicken"],
    "chicken": ["hen", "poultry"],
    "honeybee": ["bee", "bumblebee"],
    "lady beetle": ["ladybug", "ladybird"],
    "snail": ["slug", "escargot"],
    "tropical fish": ["fish", "reef fish"],
    "bird": ["songbird", "sparrow"],
    "penguin": ["antarctic bird"],
    "dolphin": ["porpoise"],
    "frog face": ["frog", "toad"],
    "hamster face": ["hamster", "gerbil"],
    "wolf face": ["wolf", "coyote"],
    "panda face": ["panda", "panda bear"],
    "fox face": ["fox", "vixen"],
    "unicorn face": ["unicorn"],
    "zebra face": ["zebra"],
    "crab": ["crustacean"],
    "owl": ["night bird"],
    "eagle": ["hawk", "bird of prey"],
    "lobster": ["crayfish"],
    "shrimp": ["prawn"],
    "swan": ["white swan"],
    "parrot": ["macaw"],
    "peacock": ["peafowl"],
    "sauropod": ["dinosaur", "brontosaurus"],
    "dromedary camel": ["camel", "dromedary"],
    "koala": ["koala bear"],
    "seal": ["sea lion"],
    "tomato": ["red tomato"],
    "banana": ["plantain"],
    "green apple": ["apple", "granny smith"],
    "cherries": ["cherry"],
    "strawberry": ["berry"],
    "grapes": ["grape", "vine fruit"],
    "peach": ["nectarine"],
    "hamburger": ["burger", "cheeseburger"],
    "slice of pizza": ["pizza", "pizza slice"],
    "french fries": ["fries", "chips"],
    "doughnut": ["donut"],
    "cookie": ["biscuit"],
    "birthday cake": ["cake", "layer cake"],
    "cupcake": ["muffin", "fairy cake"],
    "croissant": ["pastry"],
    "avocado": ["guacamole"],
    "broccoli": ["green vegetable"],
    "pretzel": ["twisted bread"],
    "sandwich": ["sub", "hoagie"],
    "taco": ["mexican food"],
    "sushi": ["nigiri"],
    "popcorn": ["movie snack"],
    "hot pepper": ["chili", "chilli pepper"],
    "cheese wedge": ["cheese"],
    "bread": ["loaf", "toast"],
    "lollipop": ["sucker"],
    "candy": ["sweet", "bonbon"],
    "spaghetti": ["pasta", "noodles"],
    "hot beverage": ["coffee", "tea"],
    "beer mug": ["beer", "pint"],
    "cocktail glass": ["cocktail", "martini"],
    "rocket": ["spaceship", "spacecraft"],
    "helicopter": ["chopper"],
    "ambulance": ["emergency vehicle"],
    "fire engine": ["fire truck"],
    "police car": ["cop car", "patrol car"],
    "taxi": ["cab", "taxicab"],
    "bus": ["coach"],
    "airplane": ["plane", "aeroplane", "jet"],
    "sailboat": ["sailing boat", "yacht"],
    "ship": ["boat", "vessel"],
    "tractor": ["farm vehicle"],
    "steam locomotive": ["locomotive", "steam train"],
    "motor scooter": ["moped", "vespa"],
    "delivery truck": ["van", "lorry"],
    "ghost": ["spirit", "phantom"],
    "skull": ["skeleton head", "death's head"],
    "pile of poo": ["poop", "poo"],
    "extraterrestrial alien": ["alien", "martian"],
    "robot face": ["robot", "android"],
    "clown face": ["clown", "jester"],
    "smiling face with sunglasses": ["cool face", "face with shades"],
    "nerd face": ["geek face", "nerd"],
    "snowman": ["frosty", "snow figure"],
    "snowflake": ["snow", "flake"],
    "umbrella": ["parasol", "brolly"],
    "cloud": ["cloudy sky"],
    "rainbow": ["spectrum"],
    "fire": ["flame", "blaze"],
    "electric light bulb": ["light bulb", "lamp", "idea"],
    "key": ["door key"],
    "lock": ["padlock"],
    "bell": ["ringing bell", "chime"],
    "crown": ["tiara", "king's crown"],
    "trophy": ["cup", "award"],
    "soccer ball": ["football", "soccer"],
    "baseball": ["ball"],
    "kite": ["flying toy"],
    "wrapped present": ["gift", "present"],
    "jack-o-lantern": ["pumpkin", "halloween lantern"],
    "money bag": ["sack of money", "moneybag"],
    "mobile phone": ["cellphone", "smartphone"],
    "camera": ["photo camera"],
    "envelope": ["letter", "mail"],
    "sunflower": ["yellow flower"],
    "evergreen tree": ["pine tree", "fir tree"],
    "maple leaf": ["autumn leaf", "fall leaf"],
    "potted plant": ["houseplant", "plant"],
    "volcano": ["erupting mountain"],
    "droplet": ["water drop", "raindrop"],
    "compass": ["navigation compass"],
    "magnet": ["horseshoe magnet"],
    "axe": ["hatchet"],
    "coin": ["money coin"],
    "basket": ["wicker basket"],
    "boxing glove": ["boxing"],
}


@dataclass(frozen=True)
class Emoji:
    id: int
    char: str
    name: str
    synonyms: list = field(default_factory=list)

    @property
    def codepoint(self) -> str:
        return f"U+{ord(self.char):04X}"

    @property
    def train_names(self) -> list[str]:
        """The words training captions use: the canonical name and the first synonym."""
        return [self.name] + self.synonyms[:1]

    @property
    def heldout_names(self) -> list[str]:
        return self.synonyms[1:]


def emoji_list() -> list[Emoji]:
    out = []
    for i, cp in enumerate(CODEPOINTS):
        name = unicodedata.name(chr(cp)).lower()
        out.append(Emoji(i, chr(cp), name, list(SYNONYMS.get(name, []))))
    return out


EMOJI = emoji_list()
