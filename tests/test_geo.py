"""Scene geometry and dates as pure functions, pinned to numbers worked out by hand."""
import re

import numpy as np
import pytest

from duch.data.geo import (
    bounds_of,
    ccw_ring,
    convex_hull,
    inside_box,
    overlaps_box,
    tile_offsets,
    tile_windows,
    to_lonlat,
    window_corners,
)
from duch.data.scene_dates import parse_date
from duch.pipeline import DuchError
from duch.pipeline.errors import spelled
from duch.pipeline.retrieval.filters import PlaceFilter, parse_bbox


@pytest.mark.parametrize("size, tile, stride, offsets", [
    (512, 256, 256, [0, 256]),  # a multiple: no extra tile
    (600, 256, 256, [0, 256, 344]),  # 88 pixels left over: a last tile shifted back to end at 600
    (520, 256, 256, [0, 256, 264]),
    (600, 256, 128, [0, 128, 256, 344]),  # 384 + 256 > 600: shifted back as well
    (640, 256, 128, [0, 128, 256, 384]),
    (256, 256, 256, [0]),
    (200, 256, 256, [0]),  # shorter than a tile: one tile, read padded
])
def test_tile_offsets_follow_the_shifted_last_tile_rule(size, tile, stride, offsets):
    assert tile_offsets(size, tile, stride) == offsets


def test_tile_windows_are_clipped_to_the_scene_and_numbered_row_by_row():
    assert tile_windows(600, 300, 256, 256) == [
        (0, 0, (0, 0, 256, 256)), (0, 1, (256, 0, 256, 256)), (0, 2, (344, 0, 256, 256)),
        (1, 0, (0, 44, 256, 256)), (1, 1, (256, 44, 256, 256)), (1, 2, (344, 44, 256, 256))]
    assert tile_windows(200, 100, 256, 256) == [(0, 0, (0, 0, 200, 100))]


def test_window_corners_follow_the_affine_transform():
    north_up = (0.5, 0.0, 1000.0, 0.0, -0.5, 2000.0)  # 0.5 m pixels, origin (1000, 2000)
    corners = window_corners(north_up, [(10, 20, 4, 6)])
    assert corners.tolist() == [[[1005.0, 1990.0], [1007.0, 1990.0], [1007.0, 1987.0], [1005.0, 1987.0]]]
    rotated = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0)  # x = row, y = col
    assert window_corners(rotated, [(1, 2, 3, 4)]).tolist() == [[[2, 1], [2, 4], [6, 4], [6, 1]]]


def test_to_lonlat_pins_known_points():
    # UTM 11N's central meridian at the equator, and a point near Merced, California (PROJ's own numbers).
    lonlat = to_lonlat("EPSG:32611", np.array([[[500000.0, 0.0], [191533.216453, 4133833.923858]]]))
    np.testing.assert_allclose(lonlat[0, 0], [-117.0, 0.0], atol=1e-9)
    np.testing.assert_allclose(lonlat[0, 1], [-120.48, 37.30], atol=1e-7)
    same = np.array([[[-120.5, 37.25], [-120.4, 37.3]]])
    np.testing.assert_allclose(to_lonlat("EPSG:4326", same), same, atol=1e-12)
    assert to_lonlat("EPSG:4326", np.zeros((0, 4, 2))).shape == (0, 4, 2)


def test_box_tests_overlap_inside_and_touching():
    square = np.array([[[0, 0], [2, 0], [2, 2], [0, 2]]], float)
    diamond = np.array([[[2, 0], [4, 2], [2, 4], [0, 2]]], float)  # a square turned 45 degrees, centre (2, 2)
    nan = np.full((1, 4, 2), np.nan)
    polys = np.concatenate([square, diamond, nan])
    assert overlaps_box(polys, (1, 1, 3, 3)).tolist() == [True, True, False]
    # [2, 3] x [0, 1] only touches the square along x = 2, and shares (2.5, 0.9) with the diamond |x-2|+|y-2| <= 2
    assert overlaps_box(polys, (2, 0, 3, 1)).tolist() == [False, True, False]
    # [0, 0.9]^2 lies beyond the diamond's edge x + y = 2: its box axes overlap, the edge's normal separates them
    assert overlaps_box(polys, (0, 0, 0.9, 0.9)).tolist() == [True, False, False]
    assert overlaps_box(polys, (-1, -1, 5, 5)).tolist() == [True, True, False]
    assert inside_box(polys, (-1, -1, 5, 5)).tolist() == [True, True, False]
    assert inside_box(polys, (0, 0, 2, 2)).tolist() == [True, False, False]  # closed: corners on the edge are in
    assert inside_box(polys, (0, 0, 4, 3.9)).tolist() == [True, False, False]
    np.testing.assert_array_equal(bounds_of(diamond), [[0, 0, 4, 4]])


def test_geojson_rings_are_closed_and_counterclockwise():
    clockwise = [[0, 1], [1, 1], [1, 0], [0, 0]]  # ul, ur, lr, ll of a north-up tile
    ring = ccw_ring(clockwise)
    assert ring == [[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 0.0]]
    assert ccw_ring(ring[:4]) == ring


@pytest.mark.parametrize("text, date", [
    ("2021-06-03", "2021-06-03"), ("2021:06:03 10:22:01", "2021-06-03"), ("2021-06-03T10:22:01.5Z", "2021-06-03"),
    ("20210603", "2021-06-03"), ("2021/06/03", "2021-06-03"), ("2021-02-30", None), ("June 3, 2021", None),
    ("2021-06-031", None), (None, None), ("", None),
])
def test_dates_are_read_in_the_forms_files_hold(text, date):
    assert parse_date(text) == date


def test_bbox_and_dates_are_checked_with_one_line_each():
    assert parse_bbox("-120.6,37.2,-120.4,37.4") == (-120.6, 37.2, -120.4, 37.4)
    for text, said in [("1,2,3", "four numbers"), ("a,b,c,d", "four numbers"), ("10,0,5,1", "MINLON 10 is not below"),
                       ("0,5,1,2", "MINLAT 5 is not below"), ("0,0,200,1", "within -180..180"),
                       ("0,-91,1,1", "within -90..90"), ("0,0,nan,1", "four numbers")]:
        with pytest.raises(DuchError, match=said):
            parse_bbox(text)
    with pytest.raises(DuchError, match="`date_from` 2022-01-01 is after `date_to` 2021-01-01"):
        PlaceFilter.parse(date_from="2022-01-01", date_to="2021-01-01")
    with pytest.raises(DuchError, match="`date_to` 'soon'"):
        PlaceFilter.parse(date_to="soon")
    with pytest.raises(DuchError, match="give the `bbox` too"):
        PlaceFilter.parse(inside=True)
    assert not PlaceFilter.parse().active
    assert PlaceFilter.parse(bbox="-120.4775,37.29,-120.47,37.31", date_to="2021-06-03").describe() == (
        "overlapping -120.4775,37.29,-120.47,37.31, dated ... to 2021-06-03")
    assert PlaceFilter.parse(date_from="20210101").date_from == "2021-01-01"


def test_the_cli_and_the_api_name_the_filters_their_own_way_and_the_api_takes_a_box_as_four_numbers():
    assert PlaceFilter.parse(bbox=[-120.6, 37.2, -120.4, 37.4]).bbox == (-120.6, 37.2, -120.4, 37.4)
    for kwargs, api, cli in [
            (dict(bbox=[1, 2, 3]), r"^bbox '1,2,3': give four numbers MINLON", r"^--bbox '1,2,3': give four numbers"),
            (dict(date_from="2022-01-01", date_to="2021-01-01"), r"^date_from 2022-01-01 is after date_to 2021-01-01",
             r"^--date-from 2022-01-01 is after --date-to 2021-01-01"),
            (dict(inside=True), r"^inside says how tiles meet a bbox; give the bbox too$",
             r"^--inside says how tiles meet a --bbox; give the --bbox too$")]:
        with pytest.raises(DuchError) as error:
            PlaceFilter.parse(**kwargs)
        assert re.match(api, spelled(str(error.value), "api")) and re.match(cli, spelled(str(error.value), "cli"))


def test_convex_hull_of_tile_corners_is_the_scene_outline():
    # Two tiles side by side (their shared edge's corners inside the outline) and a third below the first.
    corners = [[0, 0], [1, 0], [1, 1], [0, 1], [1, 0], [2, 0], [2, 1], [1, 1], [0, 1], [1, 1], [1, 2], [0, 2]]
    assert convex_hull(corners).tolist() == [[0, 0], [2, 0], [2, 1], [1, 2], [0, 2]]
    turned = convex_hull([[0, 0], [3, 1], [2, 4], [-1, 3], [1, 2], [np.nan, 9]])  # a square turned, and its middle
    assert turned.tolist() == [[-1, 3], [0, 0], [3, 1], [2, 4]]
    assert convex_hull([[1, 1], [1, 1]]).tolist() == [[1, 1]]
