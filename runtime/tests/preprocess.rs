//! Image loading and normalisation.

use duet_runtime::manifest::{ImageFit, ImageSpec};
use duet_runtime::preprocess::{load_image, resize_for, to_pixels, ImageError};
use image::{Rgb, RgbImage};

fn spec(size: usize) -> ImageSpec {
    ImageSpec {
        size,
        channels: 3,
        mean: [0.5; 3],
        std: [0.5; 3],
        fit: ImageFit::Stretch,
    }
}

#[test]
fn corrupt_png_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("broken.png");
    // A PNG signature followed by garbage.
    let mut bytes = vec![0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
    bytes.extend_from_slice(b"garbage garbage garbage");
    std::fs::write(&p, bytes).unwrap();
    match load_image(&p) {
        Err(e @ ImageError::Decode { .. }) => {
            assert!(e.to_string().contains("broken.png"), "{e}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn missing_file_names_the_path() {
    match load_image("/nonexistent/pic.png") {
        Err(e @ ImageError::Read { .. }) => assert!(e.to_string().contains("/nonexistent/pic.png")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn png_round_trip_and_normalisation() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ok.png");
    let mut img = RgbImage::new(4, 4);
    img.put_pixel(1, 2, Rgb([255, 0, 51]));
    img.save(&p).unwrap();
    let loaded = load_image(&p).unwrap();
    assert_eq!(loaded, img);
    let px = to_pixels(&loaded, &spec(4)).unwrap();
    assert_eq!(px.shape(), &[1, 3, 4, 4]);
    // (x/255 - 0.5) / 0.5 ; pixel (x=1, y=2) lands at [.., y, x].
    assert!((px[[0, 0, 2, 1]] - 1.0).abs() < 1e-6);
    assert!((px[[0, 1, 2, 1]] + 1.0).abs() < 1e-6);
    assert!((px[[0, 2, 2, 1]] - (51.0 / 255.0 - 0.5) / 0.5).abs() < 1e-6);
    assert!((px[[0, 0, 0, 0]] + 1.0).abs() < 1e-6);
}

#[test]
fn wrong_size_is_refused_and_resize_fixes_it() {
    let img = RgbImage::from_pixel(10, 6, Rgb([10, 20, 30]));
    match to_pixels(&img, &spec(8)) {
        Err(ImageError::WrongImageSize { expected, got }) => {
            assert_eq!(expected, 8);
            assert_eq!(got, (10, 6));
        }
        other => panic!("{other:?}"),
    }
    let resized = resize_for(&img, &spec(8));
    assert_eq!(resized.dimensions(), (8, 8));
    assert_eq!(
        to_pixels(&resized, &spec(8)).unwrap().shape(),
        &[1, 3, 8, 8]
    );
    let same = resize_for(&resized, &spec(8));
    assert_eq!(same, resized);
}

#[test]
fn resize_follows_the_bundles_fit() {
    // A wide red image: stretched it fills the square; padded it leaves grey bands above and
    // below, as the training images of a `pad` run had.
    let wide = RgbImage::from_pixel(40, 10, Rgb([200, 0, 0]));
    let stretched = resize_for(&wide, &spec(8));
    assert_eq!(stretched.get_pixel(4, 0).0, [200, 0, 0]);
    let padded = resize_for(
        &wide,
        &ImageSpec {
            fit: ImageFit::Pad,
            ..spec(8)
        },
    );
    assert_eq!(padded.dimensions(), (8, 8));
    assert_eq!(padded.get_pixel(4, 0).0, [duet_spec::PAD_GREY; 3]);
    assert_eq!(padded.get_pixel(4, 4).0, [200, 0, 0]);
    assert_eq!(padded, duet_spec::fit_image(&wide, 8, ImageFit::Pad));
}
