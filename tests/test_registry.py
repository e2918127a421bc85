"""The component registry: lookups with helpful errors, duplicate detection, validated registrations."""
import sys

import attr
import attrs
import pytest
from torch import nn

from toolkit.families import MODEL_FAMILIES, NAMES, SPEC_TYPES
from toolkit.plugin_manager import default_registry
from toolkit.registry import (
    NoOptions,
    Registry,
    RegistryError,
    Source,
    UnknownComponentError,
    field_docs,
    first_line,
)


@attrs.frozen
class WidthOptions:
    width: int = 4
    tags: list = attrs.Factory(lambda: ["a"])


class Widget(nn.Module):
    """A widget for tests.

    More text that is not the one-line doc.
    """

    Options = WidthOptions


def registry_with(*names, family="attention") -> Registry:
    reg = Registry()
    for name in names:
        reg.register(family, name, Widget, source=Source("tests.plugin", "testpkg", "1.0"))
    return reg


def test_unknown_name_suggests_the_closest_and_lists_all():
    reg = registry_with("mha", "gqa", "alibi_attn")
    with pytest.raises(UnknownComponentError) as info:
        reg.get("attention", "mah")
    msg = str(info.value)
    assert msg == "unknown attention 'mah'; did you mean 'mha'? (registered: alibi_attn, gqa, mha)"
    assert isinstance(info.value, KeyError) and isinstance(info.value, RegistryError)


def test_unknown_name_without_a_close_match_still_lists_names():
    msg = str(pytest.raises(UnknownComponentError, registry_with("mha").get, "attention", "zzzzzz").value)
    assert "did you mean" not in msg and "(registered: mha)" in msg


def test_unknown_name_in_an_empty_family_says_none_registered():
    assert "(registered: none)" in str(pytest.raises(UnknownComponentError, Registry().get, "mlp", "gelu").value)


def test_unknown_family_is_an_error_with_a_hint():
    with pytest.raises(RegistryError, match=r"unknown component family 'norms'; did you mean 'norm'\?"):
        Registry().get("norms", "layernorm")
    assert MODEL_FAMILIES == ("attention", "norm", "position", "mlp", "block")
    assert set(NAMES) >= {*MODEL_FAMILIES, "schedule", "tokenizer", "dataset", "evaluator", "command"}


def test_duplicate_registration_in_one_namespace_names_both_sources_and_what_to_do():
    reg = registry_with("mha")
    with pytest.raises(RegistryError) as info:
        reg.register("attention", "mha", Widget, source=Source("tests.other", "testpkg", "1.1"))
    assert str(info.value) == (
        "attention 'mha' registered twice in namespace 'testpkg': by testpkg 1.0 (tests.plugin) and by testpkg 1.1 "
        "(tests.other); rename one of them (a plugin file's namespace is its file name, so renaming the file also "
        "lets both load)"
    )
    assert reg.get("attention", "mha").source.version == "1.0"  # the first one stays


def test_a_name_in_two_namespaces_is_chosen_by_namespace_and_a_bare_name_means_the_builtin():
    reg = Registry()
    builtin = reg.register("attention", "diff", Widget, source=Source("toolkit.plugins.differential", "playattention", "1"))
    mine = reg.register("attention", "diff", Widget, source=Source("/somewhere/my_diff.py"))
    assert reg.get("attention", "diff") is builtin and reg.get("attention", "playattention:diff") is builtin
    assert reg.get("attention", "my_diff:diff") is mine and mine.qualified == "my_diff:diff"
    assert reg.names("attention") == ["diff", "my_diff:diff"] and list(reg) == [builtin, mine]
    assert ("attention", "my_diff:diff") in reg and ("attention", "other:diff") not in reg
    msg = str(pytest.raises(UnknownComponentError, reg.get, "attention", "other:diff").value)
    assert msg.startswith("unknown attention 'other:diff'") and "my_diff:diff" in msg


def test_a_bare_name_two_plugins_share_without_a_builtin_asks_whose():
    reg = Registry()
    reg.register("norm", "dyt", Widget, source=Source("a/first.py"))
    reg.register("norm", "dyt", Widget, source=Source("b/second.py"))
    with pytest.raises(UnknownComponentError) as info:  # the recipe converter reports it at $.model.norm.kind
        reg.get("norm", "dyt")
    assert str(info.value) == "norm 'dyt' is registered by several plugins; choose one: 'first:dyt' or 'second:dyt'"
    assert reg.names("norm") == ["first:dyt", "second:dyt"] and ("norm", "dyt") not in reg


def test_a_failed_registration_taken_back_leaves_the_others_of_its_name():
    reg = Registry()
    keep = reg.register("mlp", "moe", Widget, source=Source("toolkit.plugins.moe", "playattention", "1"))
    gone = reg.register("mlp", "moe", Widget, source=Source("x.py"))
    reg.remove(gone)
    assert reg.names("mlp") == ["moe"] and reg.get("mlp", "moe") is keep


def test_same_name_in_different_families_is_fine():
    reg = registry_with("x", family="norm")
    reg.register("mlp", "x", Widget)
    assert reg.names("norm") == ["x"] and reg.names("mlp") == ["x"]


@pytest.mark.parametrize("options", [
    attrs.make_class("MutableWithDefault", {"x": attrs.field(default=1)}),
    attrs.make_class("MutableRequired", {"x": attrs.field()}),
    attrs.make_class("MutableValidated", {"x": attrs.field(validator=attrs.validators.instance_of(int))}),
    attr.make_class("OldStyleMutable", {"x": attr.ib(default=0)}),
], ids=lambda c: c.__name__)
def test_mutable_options_classes_are_refused(options):
    with pytest.raises(RegistryError, match=f"options class {options.__name__} must be frozen"):
        Registry().register("mlp", "m", Widget, options)


def test_options_must_be_an_attrs_class():
    class Plain:
        width = 4

    with pytest.raises(RegistryError, match=r"mlp 'm': options must be an attrs class"):
        Registry().register("mlp", "m", Widget, Plain)


@pytest.mark.parametrize("options", [
    WidthOptions, NoOptions,
    attrs.make_class("FrozenRequired", {"x": attrs.field()}, frozen=True),
    attr.make_class("OldStyleFrozen", {"x": attr.ib(default=0)}, frozen=True),
], ids=lambda c: c.__name__)
def test_frozen_options_classes_are_accepted(options):
    assert Registry().register("mlp", "m", Widget, options).options is options


def test_factory_must_be_callable_and_name_identifier_like():
    with pytest.raises(RegistryError, match="factory must be callable, got int"):
        Registry().register("mlp", "m", 3)
    with pytest.raises(RegistryError, match="name must be an identifier-like string, got 'two words'"):
        Registry().register("mlp", "two words", Widget)
    assert Registry().register("mlp", "swi-glu", Widget).name == "swi-glu"


def test_options_and_doc_default_to_the_factory():
    comp = Registry().register("mlp", "w", Widget)
    assert comp.options is WidthOptions
    assert comp.doc == "A widget for tests."
    assert comp.source == Source("<python>")


def test_factory_without_options_gets_no_options():
    comp = Registry().register("norm", "plain", nn.Identity, doc="identity")
    assert comp.options is NoOptions and comp.option_fields() == [] and comp.doc == "identity"


def test_option_fields_list_name_type_and_default():
    comp = Registry().register("mlp", "w", Widget)
    assert comp.option_fields() == [("width", "int", 4), ("tags", "list", ["a"])]


def test_iteration_is_by_family_then_name_and_membership_works():
    reg = Registry()
    reg.register("mlp", "b", Widget)
    reg.register("attention", "z", Widget)
    reg.register("mlp", "a", Widget)
    assert [(c.family, c.name) for c in reg] == [("attention", "z"), ("mlp", "a"), ("mlp", "b")]
    assert ("mlp", "a") in reg and ("norm", "a") not in reg


def test_source_string_shows_package_version_and_plugin():
    assert str(Source("toolkit.plugins.attention", "playattention", "0.1.0")) == "playattention 0.1.0 (toolkit.plugins.attention)"
    assert str(Source("/tmp/x.py")) == "/tmp/x.py"
    assert str(Source("ep", "pkg", None)) == "pkg ? (ep)"


def test_field_docs_read_the_comment_above_a_field_or_at_the_end_of_its_line_and_from_base_classes():
    assert field_docs(Documented) == {"width": "how wide; more than one line", "depth": "how deep",
                                      "extra": "only in the subclass"}
    assert field_docs(attrs.make_class("Made", {"x": attrs.field(default=1)})) == {}  # no source: no docs


@attrs.frozen
class _DocumentedBase:
    # how wide;
    # more than one line
    width: int = 4
    depth: int = 2  # how deep
    bare: int = 0


@attrs.frozen
class Documented(_DocumentedBase):
    # only in the subclass
    extra: str = ""


# -- parts registered by name ("module:attr"), imported when first built ---------------------------------
LAZY_IMPL = '''
import attrs
from torch import nn


@attrs.frozen
class OtherOptions:
    width: int = 4


class Lazy(nn.Module):
    """A part imported only when built."""

    def __init__(self, opts, *args):
        super().__init__()
        self.width = opts.width


class WrongOptions(Lazy):
    """Declares other options than it was registered with."""

    Options = OtherOptions


class ChecksOnItsClass(Lazy):
    """Has a recipe check that a reader of the recipe would never see."""

    @staticmethod
    def check_recipe(opts, recipe):
        return ["$.model: never seen"]


NOT_CALLABLE = 3
'''


@pytest.fixture
def lazy_module(tmp_path, monkeypatch):
    """The name of a fresh module (in tmp_path, on sys.path) for lazy registrations to point at."""
    name = f"lazy_impl_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(LAZY_IMPL)
    (tmp_path / f"{name}_raises.py").write_text("raise RuntimeError('no GPU here')\n")  # fails as it loads
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)
    sys.modules.pop(f"{name}_raises", None)


def test_a_part_registered_by_name_is_imported_only_when_first_built(lazy_module):
    reg = Registry()
    comp = reg.register("mlp", "lazy", f"{lazy_module}:Lazy", WidthOptions, "A part imported only when built.")
    assert comp.lazy and lazy_module not in sys.modules and reg.names("mlp") == ["lazy"]
    assert comp.option_fields()[0][:2] == ("width", "int")  # listing needs the options only
    module = reg.build(comp_spec("mlp", "lazy"))
    assert lazy_module in sys.modules and module.width == 4 and comp.factory is sys.modules[lazy_module].Lazy


def comp_spec(family, kind):
    return SPEC_TYPES[family](kind)


@pytest.mark.parametrize("target, said", [
    ("{m}_gone:Lazy", "cannot import {m}_gone: No module named '{m}_gone'"),
    ("{m}:Absent", "{m} has no 'Absent'"),
    ("{m}_raises:Lazy", "importing {m}_raises failed: RuntimeError: no GPU here"),
    ("{m}:NOT_CALLABLE", "not callable, got int"),
    ("{m}:WrongOptions", "its Options is OtherOptions, but it was registered with WidthOptions"),
    ("{m}:ChecksOnItsClass", "its check_recipe must be on its options class, WidthOptions: a part registered by name is not "
                                 "imported to check a recipe"),
])
def test_a_part_registered_by_name_that_is_not_what_was_registered_fails_when_built_naming_the_registration(
        lazy_module, target, said):
    reg = Registry()
    target = target.format(m=lazy_module)
    reg.register("mlp", "lazy", target, WidthOptions, source=Source("tests.plugin", "testpkg", "1.0"))
    with pytest.raises(RegistryError) as err:
        reg.build(comp_spec("mlp", "lazy"))
    assert str(err.value) == (f"mlp 'lazy' (registered by testpkg 1.0 (tests.plugin) as {target!r}): "
                              + said.format(m=lazy_module))


def test_registering_by_name_needs_a_module_attribute_name_and_the_options_class():
    with pytest.raises(RegistryError, match=r"a lazy factory is 'package.module:attribute', got 'lazy_impl.Lazy'"):
        Registry().register("mlp", "lazy", "lazy_impl.Lazy", WidthOptions)
    with pytest.raises(RegistryError, match=r"registering 'lazy_impl:Lazy' by name needs its options class"):
        Registry().register("mlp", "lazy", "lazy_impl:Lazy")


def test_a_part_registered_by_name_is_described_by_its_options_docstring_unless_given_a_doc():
    reg = Registry()
    assert reg.register("mlp", "a", "lazy_impl:Lazy", NoOptions).doc == "Options class for components that take none."
    assert reg.register("mlp", "b", "lazy_impl:Lazy", NoOptions, "Mine.").doc == "Mine."


def test_the_code_a_registry_stands_for_includes_the_module_a_lazy_registration_names(lazy_module, tmp_path):
    reg = Registry()
    reg.register("mlp", "lazy", f"{lazy_module}:Lazy", WidthOptions)
    before = reg.code()[lazy_module]
    (tmp_path / f"{lazy_module}.py").write_text(LAZY_IMPL + "\n# edited\n")
    assert before.startswith(f"{lazy_module} (sha256 ") and reg.code()[lazy_module] != before


def test_every_builtin_registered_by_name_is_the_class_its_registration_describes():
    # the built-ins declare options and a one-line doc without importing their code (plugins/impl/):
    # each must still be what it says, or `plugins` would list what is not built
    lazy = [c for c in default_registry() if c.lazy]
    assert {c.family for c in lazy} >= {"attention", "norm", "position", "mlp", "block", "optimizer", "evaluator"}
    for comp in lazy:
        factory = comp.factory  # RegistryError if it does not import, or declares other options
        assert comp.doc == first_line(factory.__doc__), f"{comp.family} {comp.name!r}: {comp.doc!r}"
