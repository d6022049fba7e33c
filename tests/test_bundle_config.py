"""The bundle's network definition builds through monai.bundle and matches the metadata's in/out spec."""

from __future__ import annotations

from helpers import CONFIGS
from monai.bundle import ConfigParser, verify_net_in_out

from custom.networks import SamMed3D


def test_network_def_builds_the_named_variant():
    parser = ConfigParser()
    parser.read_config(CONFIGS / "inference.json")
    parser["network_name"] = "sam_med3d_tiny"
    net = parser.get_parsed_content("network_def")
    assert isinstance(net, SamMed3D)
    assert net.image_encoder.pos_embed.shape == (1, 8, 8, 8, 192)


def test_verify_net_in_out():
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(CONFIGS / "metadata.json"),
        config_file=str(CONFIGS / "inference.json"),
        device="cpu",
        network_name="sam_med3d_tiny",
    )
