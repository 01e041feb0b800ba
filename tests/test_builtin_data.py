"""The builtin generators' text lives in realign/data/builtin/*.yaml: loaded alike, packaged, and unchanged.

The digests below were recorded before the literal tuples and dicts moved out of realign.data.safety, .tasks,
.benign and realign.eval.synthetic_pairs into the YAML files: each constant and each generator output must still
match them byte for byte (same values, same types, same order).
"""

import dataclasses
import fnmatch
import hashlib
import json
from importlib import resources
from pathlib import Path

import pytest
import yaml
from datasets import Dataset

from realign.data import alignment, benign, builtin, safety, tasks
from realign.errors import RealignError
from realign.eval import synthetic_pairs

MODULES = {"safety": safety, "tasks": tasks, "benign": benign, "synthetic_pairs": synthetic_pairs}
DATA_FILES = {"safety.yaml": safety, "tasks.yaml": tasks, "benign.yaml": benign,
              "synthetic_pairs.yaml": synthetic_pairs}
PACKAGE_DIR = Path(builtin.__file__).parent


def constant_digest(value) -> str:
    return hashlib.sha256(repr(value).encode()).hexdigest()


def plain(value):
    if isinstance(value, Dataset):
        return value.to_list()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    return value


def output_digest(value) -> str:
    text = json.dumps(plain(value), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# Digests of the module constants: sha256 of repr(value), which keeps the types (tuple vs list, int vs str
# keys, range objects, None). Taken before the literals moved to realign/data/builtin/.
CONSTANT_DIGESTS = {
    "safety.HARM_CATEGORIES": "0202327939d0fd18da5d4e5c87cfe33e43658eb3604a3b73174eca6f981070af",
    "safety.TRAIN_PROMPT_TEMPLATES": "9517ddd2a67cf5a31078955aa5f995e2bbca4f6342a7671e23f55dd2dee836c4",
    "safety.TRAIN_HARMFUL_ACTIONS": "e81dbb8f332c42b6dd11204483690ff9ffa3cf6fbe00ad7d14f8569649fac671",
    "safety.TEST_HARMFUL_REQUESTS": "5d7b5782e5046b6aea7eb3219a7106bc7b76df9a4c75d9fde4ca1b1bb804b373",
    "safety.REFUSALS": "9c2528a0574eccded1b86becf0b595958a1d449f52b8ca04edcb120f31c63d9c",
    "safety.CATEGORY_REDIRECTS": "cc74ffcf98cacaf5580a4e77f4124936fb80a30492df0cd2b5a9a36582127ca9",
    "safety.COMPLIANCE_OPENERS": "9b079147901f756c431f4077ea0cb8b06be6590781b25b6de8a939ce6dc91574",
    "safety.COMPLIANCE_STEPS": "671d2e5e5d19a9e158c33e897ad1c5001a0abad4cd6c419f08613f9d483d74c1",
    "safety.COMPLIANCE_CLOSERS": "927ff22b61ff425bff87e855fcd376a1c8c5c4dc7bfd9c861d83c448027675a1",
    "tasks.SST2_INSTRUCTION": "5e21b021aa4eabe13d1acf022f8c3d767d89bc6ee80e3ed824f37e9ea371b40a",
    "tasks.AG_NEWS_INSTRUCTION": "a29e6e56370607446835bbafe417c5a3a67f357aef8f6ce1481da707a189d6fd",
    "tasks.SST2_LABELS": "01c7b2f81c013be493f4411b2d13c5a579fc2026184b7fbb988e7e40ec5f9503",
    "tasks.AG_NEWS_LABELS": "162eda847feadcbb4ba8baa79e5bde5343846969ff25c8fb35d6a647748ad72c",
    "tasks.SST2_TEMPLATES": "5e8bb3f73113726a30d42ef4e4e589af625cc04ed1edfa2db8e0160646629ceb",
    "tasks.SST2_SUBJECTS": "7110d5ed10736d744469206f68f5979b90bb12f57c769ad472d9e5f5a8b3a17a",
    "tasks.SST2_ADJECTIVES": "5f3eaf9973a5b0b2df34dcbda5b14769d02b6c5ae0440d07e4a43ac5e90299f7",
    "tasks.AG_NEWS_SOURCES": "f451ccee18c306c0e2411c0edc8a078a224fb6d448b8af1fd97424b0a3fbdd09",
    "tasks.AG_NEWS_CONTENT": "5aa0aec3403112bb5ab3d6dfacf808bb56f2c65f6fa706a85d371af501c51f0a",
    "tasks.GSM8K_NAMES": "6d99964c49d378915a19b6d58a94b185b06f6a9283e45ad49aa9c00bd12ebe34",
    "tasks.SHOPPING_ITEMS": "5bf46be1af0d77fd2e1efdf086616ab6f7cbb8db97b74bed6302d5d12403a27a",
    "benign.CAPITALS": "62ccc551d74d3923d925476c483b3e77419cbf713e675fdfc5fd3192b99e5c9e",
    "benign.CAPITAL_QUESTIONS": "b280434df59168b8451d1c076ac21058d259607d6c1a63630ee55fc3cacb92da",
    "benign.ELEMENT_SYMBOLS": "220c4db1f19ad447c5bb9f5b83c99ff565ff8a8c753ecdcfdec9b4083c623909",
    "benign.ELEMENT_QUESTIONS": "020391c78a371fdbce2a133ba1792e61d561a35b7ea07c3d86722b98c3ad6426",
    "benign.FACTS": "d1a5313ba30a5ac3add0a9527fc8268e1b63b11da14fba9ef5554103dc0f67f3",
    "benign.ARITHMETIC_TEMPLATES": "9bdbdb44fecd97998eee5ad8ab2cef39ffcb8f7c2e4f84b9fff12e9cf4972d83",
    "benign.SORT_WORDS": "1a66b6e141c0f6f7c4e54217562ace4b602234afe08b9943ec76240c5f56790b",
    "benign.SORT_INSTRUCTION": "224d047e7738c0efc4295360dd318da832c73b4b5b09189619fa9e8376d5bc46",
    "benign.PAST_TENSE_SUBJECTS": "d29ac1ceeb18026da916fbe3ab91dc7294f816382bfe788d6ea8a4af9db685ce",
    "benign.PAST_TENSE_VERBS": "696c4488b759c7ae45a39d862e281b2df5b7e6d6f5dea3f094df877db64ae681",
    "benign.PAST_TENSE_INSTRUCTION": "ab81378d6bb952760f7c457281e95717e341ef658a93a0133e3e6c6cdaecc964",
    "benign.PLURALS": "7f6d40311229abb90dd60402c772b043c9f2b7305a3e56ed2f34a9822c613694",
    "benign.PLURAL_INSTRUCTION": "3e442b51f1d339ee3d3f56293ba8d82d75e5739d31cb7e9621f80cd9f0967a18",
    "benign.ANTONYMS": "acdbe412c4d84f55616901a1df9b641cb739d573816ce08095aba83eccd56fe3",
    "benign.ANTONYM_INSTRUCTION": "3fee7e1347e9bdf6a37a0cb656502b191984294022832b89e901afddbaa989d1",
    "benign.NOTE_NAMES": "e50aea0be9ff8140f0ecc1b06310ac7bbffbbbef7731236fb0f23a4eb85fbad4",
    "benign.THANK_YOU_GIFTS": "87476c1a8042a1d934331f8c06175f993ff7feee90ee125f48117190a9f09e70",
    "benign.INVITATION_EVENTS": "d41af1b763cb7907653ca466642052f6588cbf2445bf07b9ba6484d3db9afa83",
    "benign.INVITATION_DAYS": "10b9319ecad3ea0b41656f4dbbb947a48f545d0d75e7ab635c94c6e4546ba0a3",
    "synthetic_pairs.PAIR_KINDS": "d12e044b1799c8f3da90d581b6475de476220bb65036501b83962e23b60bce00",
    "synthetic_pairs.OFF_TOPIC_NAMES": "6254913d9533d7db8f5dac90bcdc57a8ce8fb14457c6c11704e9651632d2c576",
    "synthetic_pairs.NAME_LIST_FORMATS": "f52265949405f1a48a1a989db1e165bd9f3ba4a401f30fb3c58670b7349aaa18",
    "synthetic_pairs.BENIGN_HOWTO": "8691a3a1897c6d9f9a487d6ba0fc2d5352a35dfcabec7008875057c64637139e",
    "synthetic_pairs.HOWTO_QUESTIONS": "a2b32f3d8ee0117446387cf74c3398872fd9902842c0e27321c590ea80fdac13",
    "synthetic_pairs.RESTYLED_COMPLIANCE": "51c82e97f2434a90c41940a67c15157b68674b7cd0e966cdbd589ef6db76115f",
    "synthetic_pairs.TOPICAL_REFUSALS": "9c6bfb1c8d7e955ce727004f83612595590d89733ff93c577cae7a95e71503ba",
    "synthetic_pairs.DIRECT_COMPLIANCE": "8b49e11ebb49a76cdb26f2ae59ede051b10e75c3487a29ab186006d84adc7504",
    "synthetic_pairs.DEFLECTIONS": "ed3dd5a08552a46c7408b08f0e123c374c59e2255f592bc2cadac75ac54386ac",
    "synthetic_pairs.TRAIN_MIX": "32666974f94d7b82281defae394d93f4a2fe94d06c2da3fec66fe5bd1dbcc028",
}

# Digests of generator outputs: sha256 of a canonical JSON dump (Dataset.to_list(), dataclasses as dicts).
# Taken before the literals moved to realign/data/builtin/.
OUTPUT_DIGESTS = {
    "safety.harmful_prompts(train)": "3659c64b4ea4070b63e4ca98990bd3aefdafb1eda2fc94e4d091f41e2f1d97ae",
    "safety.harmful_prompts(test)": "fd389844d4b041e35a7b941db863c72a1ba667518540e56104eca47406f6988c",
    "safety.pku_saferlhf(train,100,0)": "cfcde56f241483f500fb870aaa697158470f5ad302c9525e0fe606e12ce9c8aa",
    "safety.pku_saferlhf(test,100,0)": "11235561210b29ed1dc7f1abe7d7ca22f2e429f59e719d5bb9fa647e9f1e7d59",
    "safety.beavertails(train,120,1,False)": "3cc9c2152175706aeeb8436929f774182444dfe91b650af7abbb36606eeb7668",
    "safety.beavertails(test,80,2,True)": "bdf36d01096c9ff855302d6ef4abb1f61786394d1ed2a74ac55f5923226bd034",
    "safety.benign_instructions(train,150,0)": "edd6342896b3ff7729954bb02731d8f305e051dd5475422710fab27f4f399396",
    "safety.benign_instructions(test,150,0)": "3eec0ba6cd0aed5f31acf85ebd784c8f4250ea513121eac8c311d2d8ac7d12a0",
    "safety.harmful_eval_prompts(50,3)": "fa4831e46174c558f8a0a7b7c4c808d155cd5ed32e6580efea2ae069537f4e55",
    "safety.harmful_eval_prompts(all,1)": "5cfa6cbbf463f4cd4d6b0f26f9f29942ca66669ec4caa72bcb7971c1b2a10ebf",
    "safety.available_counts()": "c330f6d37082ad090e7feef8d3631148c50df4c5d3796c2119dca0b9ab5fa8f4",
    "benign.knowledge_rows(train)": "bc4b30a90f214590c839bd95e6507ba8d68825ec89bf254481bbac13acf4064d",
    "benign.knowledge_rows(test)": "90224b4e55101c8f0eb38490789e23f4c610923a6389ad3bb930bf4e3fb7ea5d",
    "benign.arithmetic_rows(train)": "be2ce9ea1d89646770d3e5c1b29fd47d89df10407b502cef0b612971a720c5b9",
    "benign.arithmetic_rows(test)": "1ba81400db21c3afae4b9827be1c4e79f1ad6d548ee639711d0b6a025b66f0d9",
    "benign.writing_rows(train)": "8a41b1a3cf50ba7e8a49cfe7e0a54bb4a55a334b1dfd612cf67a91a675620f7c",
    "benign.writing_rows(test)": "deed0a835ba892b30a6459b5b6985623a40212c42b5e5f55dc75a697f49a2ec3",
    "tasks.sst2_sentences(test)": "5a9f05d7f5b94dca3215f95d5c19ab7a2a272e2ae6ffbabc066f6aaaf9268619",
    "tasks.ag_news_texts(train)": "c11bee20ca27422dc5cd664df3957b30e4f08c48f2ee88a0c9943eb321e76f2b",
    "tasks.load_task(sst2,train,60,0)": "915bc346d69f7cbf594647447641115567930cfde921b232d44991d275012a59",
    "tasks.load_task(sst2,test,25,3)": "076faaf726dca68463e955202f79013375b2604f99c468907a31947f867ca430",
    "tasks.load_task(ag_news,train,60,0)": "3e5d9fac9bf931f38f6ac6fccf17a9eb1ce0e7323148a2e7686a126a8dfa0cb9",
    "tasks.load_task(ag_news,test,25,3)": "16f0f259c456d00d4bc96d6e54873830e640b602ee986bceedfefc73903916bb",
    "tasks.load_task(gsm8k,train,60,0)": "6cdc9204b43ff4a3d1492d613d83f3092c64cc21f67ddee4a89bc36b89192e72",
    "tasks.load_task(gsm8k,test,25,3)": "d2a96921b6efba9b520ad5dafff70b95d6218a2d24d1b71a9f14979ece64c6ab",
    "tasks.load_task(alpaca,train,60,0)": "99addc9ac98e42102e6218d79d9062ac6b34b8ad233742268550933249bf71fe",
    "tasks.load_task(alpaca,test,25,3)": "384419d38c5b264cc4df073847ecf5f989e50aa1738685c00eee1f5e263652e5",
    "tasks.sst2(train,100,5)": "0ea004852b0b60717d1ec223a9c1aa18374be6381d8ded87b968826b9a4f7bb3",
    "tasks.ag_news(test,100,5)": "6fbbb7fb850353a77b03045cdcc140bf021847621a964fd59eb387d37da4af60",
    "tasks.gsm8k(train,100,5)": "df006c8899295a55f0027c3a307568a59e1ae3aa190394a8fe7b5cd77cfceb76",
    "tasks.alpaca(test,100,5)": "61dc766cfc11395c3cf6c721f3cfb844f40a389dfea724af373fc1dfb753bec7",
    "alignment_dataset(prompt_completion,120,0)": "a5ec13ec2ff5e8bb9aade8467dc418d88832ce8ff11224e9f7dbcfd88bafae01",
    "alignment_dataset(preference,120,0)": "6c03a06c0a3cc7f31a80575125d82415f109a13322a5a64f0412ba9c8fe3e317",
    "alignment_dataset(unpaired,120,0)": "b4a78e8811c92e937ac44b768ca52640a9fe39adef851310c47b88fdcc0d18f5",
    "alignment_dataset(preference,60,2,0.5,test)": "b7ac4de0d3db1413ce78c88b3009814efb416cdebc9d9d1b5458232d5575ff2e",
    "mix_attack_dataset(sst2,100,0.1,0)": "e3491456483d6967f44790d75154f67904d93925a868bc9d57ebc9d1f65aa497",
    "mix_attack_dataset(ag_news,80,0.3,1)": "0261faa0ae213a79cb7217c3ba3e2206cfc7e0858cce504e0e00ee065916ee7f",
    "mix_attack_dataset(gsm8k,60,0.5,2)": "9535c7b38cf18eeaeafebf6fb007197008bba88f101969944974afeb08802865",
    "mix_attack_dataset(alpaca,50,0.0,3)": "80f2bdccec3b4175ffef7ed071ec80f710c3fb4293792b757e86a4db00847426",
    "sp.mixed_counts(600)": "8de42155f3780e5f3062043333a9b31871a01fd5bbcf1fa11c1851b094a6e5dd",
    "sp.labelled_pairs(train,TRAIN_MIX,0)": "d663b7b614be9f5059ac56951a49613fff862e51a71fb607228590315887f30f",
    "sp.labelled_pairs(test,mixed_counts(600),1)": "71c28a55b57ae52dff26a997ad9f076ec006da3463f32010eca6d25a1fcaeb6b",
    "sp.off_topic_texts(test,50,4)": "12a1f83c9b21a66f54145de598fb767c42b96cc63d48aa2585a6bf3db37394b5",
}

GENERATORS = {
    "safety.harmful_prompts(train)": lambda: safety.harmful_prompts("train"),
    "safety.harmful_prompts(test)": lambda: safety.harmful_prompts("test"),
    "safety.pku_saferlhf(train,100,0)": lambda: safety.pku_saferlhf("train", 100, 0),
    "safety.pku_saferlhf(test,100,0)": lambda: safety.pku_saferlhf("test", 100, 0),
    "safety.beavertails(train,120,1,False)": lambda: safety.beavertails("train", 120, 1),
    "safety.beavertails(test,80,2,True)": lambda: safety.beavertails("test", 80, 2, unsafe_only=True),
    "safety.benign_instructions(train,150,0)": lambda: safety.benign_instructions("train", 150, 0),
    "safety.benign_instructions(test,150,0)": lambda: safety.benign_instructions("test", 150, 0),
    "safety.harmful_eval_prompts(50,3)": lambda: safety.harmful_eval_prompts(50, 3),
    "safety.harmful_eval_prompts(all,1)": lambda: safety.harmful_eval_prompts(len(safety.harmful_prompts("test")), 1),
    "safety.available_counts()": safety.available_counts,
    "benign.knowledge_rows(train)": lambda: benign.knowledge_rows("train"),
    "benign.knowledge_rows(test)": lambda: benign.knowledge_rows("test"),
    "benign.arithmetic_rows(train)": lambda: benign.arithmetic_rows("train"),
    "benign.arithmetic_rows(test)": lambda: benign.arithmetic_rows("test"),
    "benign.writing_rows(train)": lambda: benign.writing_rows("train"),
    "benign.writing_rows(test)": lambda: benign.writing_rows("test"),
    "tasks.sst2_sentences(test)": lambda: tasks.sst2_sentences("test"),
    "tasks.ag_news_texts(train)": lambda: tasks.ag_news_texts("train"),
    "tasks.load_task(sst2,train,60,0)": lambda: tasks.load_task("sst2", "train", 60, 0),
    "tasks.load_task(sst2,test,25,3)": lambda: tasks.load_task("sst2", "test", 25, 3),
    "tasks.load_task(ag_news,train,60,0)": lambda: tasks.load_task("ag_news", "train", 60, 0),
    "tasks.load_task(ag_news,test,25,3)": lambda: tasks.load_task("ag_news", "test", 25, 3),
    "tasks.load_task(gsm8k,train,60,0)": lambda: tasks.load_task("gsm8k", "train", 60, 0),
    "tasks.load_task(gsm8k,test,25,3)": lambda: tasks.load_task("gsm8k", "test", 25, 3),
    "tasks.load_task(alpaca,train,60,0)": lambda: tasks.load_task("alpaca", "train", 60, 0),
    "tasks.load_task(alpaca,test,25,3)": lambda: tasks.load_task("alpaca", "test", 25, 3),
    "tasks.sst2(train,100,5)": lambda: tasks.sst2("train", 100, 5),
    "tasks.ag_news(test,100,5)": lambda: tasks.ag_news("test", 100, 5),
    "tasks.gsm8k(train,100,5)": lambda: tasks.gsm8k("train", 100, 5),
    "tasks.alpaca(test,100,5)": lambda: tasks.alpaca("test", 100, 5),
    "alignment_dataset(prompt_completion,120,0)": lambda: alignment.alignment_dataset("prompt_completion", 120, 0),
    "alignment_dataset(preference,120,0)": lambda: alignment.alignment_dataset("preference", 120, 0),
    "alignment_dataset(unpaired,120,0)": lambda: alignment.alignment_dataset("unpaired", 120, 0),
    "alignment_dataset(preference,60,2,0.5,test)":
        lambda: alignment.alignment_dataset("preference", 60, 2, benign_fraction=0.5, split="test"),
    "mix_attack_dataset(sst2,100,0.1,0)": lambda: alignment.mix_attack_dataset("sst2", 100, 0.1, 0),
    "mix_attack_dataset(ag_news,80,0.3,1)": lambda: alignment.mix_attack_dataset("ag_news", 80, 0.3, 1),
    "mix_attack_dataset(gsm8k,60,0.5,2)": lambda: alignment.mix_attack_dataset("gsm8k", 60, 0.5, 2),
    "mix_attack_dataset(alpaca,50,0.0,3)": lambda: alignment.mix_attack_dataset("alpaca", 50, 0.0, 3),
    "sp.mixed_counts(600)": lambda: synthetic_pairs.mixed_counts(600),
    "sp.labelled_pairs(train,TRAIN_MIX,0)":
        lambda: synthetic_pairs.labelled_pairs("train", synthetic_pairs.TRAIN_MIX, 0),
    "sp.labelled_pairs(test,mixed_counts(600),1)":
        lambda: synthetic_pairs.labelled_pairs("test", synthetic_pairs.mixed_counts(600), 1),
    "sp.off_topic_texts(test,50,4)": lambda: synthetic_pairs.off_topic_texts("test", 50, 4),
}


@pytest.mark.parametrize("name", CONSTANT_DIGESTS)
def test_constant_is_unchanged(name):
    module, attribute = name.split(".")
    assert constant_digest(getattr(MODULES[module], attribute)) == CONSTANT_DIGESTS[name]


def test_every_output_digest_has_a_generator():
    assert list(GENERATORS) == list(OUTPUT_DIGESTS)


@pytest.mark.parametrize("name", OUTPUT_DIGESTS)
def test_generator_output_is_unchanged(name):
    assert output_digest(GENERATORS[name]()) == OUTPUT_DIGESTS[name]


def lists_in(value) -> int:
    if isinstance(value, list):
        return 1 + sum(lists_in(item) for item in value)
    if isinstance(value, tuple):
        return sum(lists_in(item) for item in value)
    if isinstance(value, dict):
        return sum(lists_in(item) for item in value.values())
    return 0


@pytest.mark.parametrize("file", DATA_FILES)
def test_every_entry_of_a_data_file_is_a_module_constant(file):
    """Each top-level key names the constant it becomes (train_prompt_templates -> TRAIN_PROMPT_TEMPLATES),
    which holds tuples only, never a YAML list."""
    module = DATA_FILES[file]
    for key in builtin.load(file):
        value = getattr(module, key.upper())
        assert lists_in(value) == 0, key
        if isinstance(value, (str, tuple)) or key in ("train_harmful_actions", "category_redirects", "capitals"):
            assert value == builtin.section(file, key), key


def test_data_files_are_read_from_the_package_directory():
    assert Path(str(resources.files(builtin.__name__))) == PACKAGE_DIR
    assert PACKAGE_DIR == Path(safety.__file__).parent / "builtin"
    for file in [*DATA_FILES, "judge_requests.jsonl"]:
        assert (PACKAGE_DIR / file).is_file(), file
        assert builtin.read_text(file) == (PACKAGE_DIR / file).read_text(encoding="utf-8")


def test_package_data_ships_every_data_file():
    tomllib = pytest.importorskip("tomllib")
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    patterns = tomllib.loads(pyproject.read_text(encoding="utf-8"))["tool"]["setuptools"]["package-data"]["realign"]
    data_files = [path.name for path in PACKAGE_DIR.iterdir() if path.is_file() and path.suffix != ".py"]
    assert set(data_files) >= {*DATA_FILES, "judge_requests.jsonl"}
    for name in data_files:
        assert any(fnmatch.fnmatch(f"data/builtin/{name}", pattern) for pattern in patterns), name


@pytest.mark.parametrize("file", DATA_FILES)
def test_loader_reads_like_yaml_safe_load(file):
    assert builtin.load(file) == yaml.safe_load(builtin.read_text(file))


def test_missing_entry_is_reported():
    with pytest.raises(RealignError, match="no entry 'nope'"):
        builtin.section("safety.yaml", "nope")
