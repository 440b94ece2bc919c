//! Questions about images: ShapeWorld with exact answers → the tiny captioner trained on
//! captions and questions together → Burn's answers to held-out questions scored per kind
//! against the majority-answer baseline → the exported bundle answering the same questions on
//! onnxruntime and tract, through `duet ask` and through the C ABI.

use super::*;

use duet_datasets::shapeworld::QuestionKind;
use duet_runtime::DecodeOptions;
use duet_train::eval::vqa::{answer_questions, VqaReport};
use duet_train::stages::caption::{load_question_rows, QuestionRow};

/// The held-out scenes and questions, the Burn model's answers, and their report.
type BurnAnswers = (Vec<Sample>, Vec<QuestionRow>, Vec<String>, VqaReport);

fn burn_answers() -> &'static BurnAnswers {
    static ANSWERS: OnceLock<BurnAnswers> = OnceLock::new();
    ANSWERS.get_or_init(|| {
        let f = vqa_fixture();
        let samples = load_dataset(&f.val).unwrap();
        let questions = load_question_rows(std::slice::from_ref(&f.val), &samples).unwrap();
        let device = Default::default();
        let run = load_run::<Cpu>(&f.run, &device).unwrap();
        let answers = answer_questions(&run, &samples, &questions, &device).unwrap();
        let scored: Vec<_> = questions.iter().cloned().zip(answers.clone()).collect();
        let report = VqaReport::score(&scored);
        eprintln!("{report}");
        (samples, questions, answers, report)
    })
}

/// Held-out questions are answered far above what always giving each kind's most common
/// answer scores (a model that ignores the image), kind by kind where the tiny model can see
/// the attribute, and overall.
#[test]
fn vqa_answers_beat_the_majority_baseline_per_kind() {
    let (_, questions, _, report) = burn_answers();
    assert!(questions.len() > 1000, "{}", questions.len());
    for kind in QuestionKind::ALL {
        let s = report.per_kind.get(&kind).expect("every kind is asked");
        eprintln!(
            "{kind}: {:.1} % against {:.1} % ({} questions)",
            100.0 * s.accuracy(),
            100.0 * s.majority_accuracy(),
            s.questions
        );
    }
    // Measured margins over the majority answer at 6,000 steps (this fixture; a release run of
    // the same data on two peers): colour +56 / +52, size +35 / +38, shape at +55 / +54,
    // count +26 / +25, exists +31 / +30, where +45 / +38, left of +32 / +39 (28 questions),
    // above +80 / +60 (25 questions). The floors leave a band for noise. Counting and "is
    // there" are learnt only after a plateau near step 4,000 (docs/VQA.md), so a fixture
    // trained for fewer steps (`DUET_E2E_VQA_STEPS`) is held to the floors of 1,500 steps
    // (colour +46, size +26, where +39 measured there) and overall only.
    let at_ci_budget = vqa_fixture().steps >= CI_VQA_STEPS;
    let floors: &[(QuestionKind, f64)] = if at_ci_budget {
        &[
            (QuestionKind::Colour, 0.35),
            (QuestionKind::Size, 0.20),
            (QuestionKind::ShapeAt, 0.35),
            (QuestionKind::Count, 0.12),
            (QuestionKind::Exists, 0.15),
            (QuestionKind::Where, 0.25),
            (QuestionKind::LeftOf, 0.10),
            (QuestionKind::Above, 0.30),
        ]
    } else {
        &[
            (QuestionKind::Colour, 0.30),
            (QuestionKind::Size, 0.15),
            (QuestionKind::Where, 0.25),
        ]
    };
    for &(kind, margin) in floors {
        let s = &report.per_kind[&kind];
        assert!(
            s.accuracy() >= s.majority_accuracy() + margin,
            "{kind}: {:.3} vs majority {:.3}",
            s.accuracy(),
            s.majority_accuracy()
        );
    }
    let overall_margin = if at_ci_budget { 0.30 } else { 0.15 };
    assert!(
        report.overall() >= report.majority_overall() + overall_margin,
        "overall {:.3} vs majority {:.3}",
        report.overall(),
        report.majority_overall()
    );
}

/// The exported bundle answers as Burn does on onnxruntime and tract (greedy, same prompt),
/// says it answers questions, and streams the answer.
#[test]
fn the_bundle_answers_like_burn_on_every_engine() {
    let f = vqa_fixture();
    let (samples, questions, burn, _) = burn_answers();
    let bundle = Bundle::open(&f.bundle).unwrap();
    let spec = bundle
        .manifest()
        .questions
        .as_ref()
        .expect("questions in the manifest");
    assert_eq!(spec.trained_on, 8000);
    let subset: Vec<usize> = (0..questions.len()).step_by(4).collect();
    for provider in [Provider::OrtCpu, Provider::Tract] {
        let cap =
            Captioner::new(&bundle, ProviderChoice::Only(provider), &engine_options()).unwrap();
        assert!(cap.answers_questions());
        let mut agree = 0;
        for &i in &subset {
            let q = &questions[i];
            let img = &samples[q.image].image;
            let mut streamed = String::new();
            let answer = cap
                .answer_images(
                    std::slice::from_ref(img),
                    &q.question,
                    &DecodeOptions::default(),
                    Some(&mut |_, t: &str| streamed.push_str(t)),
                )
                .unwrap()
                .pop()
                .unwrap();
            assert_eq!(streamed, answer);
            agree += usize::from(answer == burn[i]);
        }
        let rate = agree as f64 / subset.len() as f64;
        assert!(
            rate >= 0.98,
            "{provider}: {agree} of {} answers as Burn's",
            subset.len()
        );
    }
}

/// `duet ask` answers a held-out question the model gets right, and refuses a caption-only
/// bundle with a message saying why; `duet_ask_rgb` gives the runtime's answer and streams it.
#[test]
fn duet_ask_and_the_c_abi_answer_questions() {
    let f = vqa_fixture();
    let (samples, questions, burn, _) = burn_answers();
    let i = (0..questions.len())
        .find(|&i| questions[i].kind == QuestionKind::Colour && burn[i] == questions[i].answer)
        .expect("a colour question answered right");
    let q = &questions[i];
    let image_path = &samples[q.image].image_path;
    let out = std::process::Command::new(duet_bin())
        .args(["ask", "--provider", "tract", "--bundle"])
        .arg(&f.bundle)
        .arg("--image")
        .arg(image_path)
        // As a person types it: no space before the question mark.
        .arg(q.question.replace(" ?", "?"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.trim(), q.answer, "{}", q.question);

    let out = std::process::Command::new(duet_bin())
        .args(["ask", "--provider", "tract", "--bundle"])
        .arg(&fixture().bundle)
        .arg("--image")
        .arg(image_path)
        .arg("what colour is the circle?")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("not trained to answer questions"),
        "{stderr}"
    );

    // The C ABI, as a C host calls it.
    use duet::*;
    unsafe extern "C" fn collect(user: *mut std::ffi::c_void, text: *const std::ffi::c_char) {
        let s = &mut *(user as *mut String);
        s.push_str(&std::ffi::CStr::from_ptr(text).to_string_lossy());
    }
    let rt = super::c_abi::sys::create(&f.bundle, "tract");
    let mut err = std::ptr::null_mut();
    let img = &samples[q.image].image;
    let question = std::ffi::CString::new(q.question.as_str()).unwrap();
    let mut streamed = String::new();
    let mut answer = std::ptr::null_mut();
    let s = unsafe {
        duet_ask_rgb(
            rt,
            img.as_raw().as_ptr(),
            img.as_raw().len(),
            img.width(),
            img.height(),
            question.as_ptr(),
            std::ptr::null(),
            Some(collect),
            &mut streamed as *mut String as *mut std::ffi::c_void,
            &mut answer,
            &mut err,
        )
    };
    assert_eq!(s, DuetStatus::Ok, "{:?}", super::c_abi::sys::take(err));
    let text = super::c_abi::sys::take(answer).expect("an answer");
    unsafe { duet_runtime_destroy(rt) };
    assert_eq!(text, q.answer);
    assert_eq!(streamed, text);
}
