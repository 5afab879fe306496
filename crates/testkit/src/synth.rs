//! Synthetic CT studies that look like what a scanner writes: fake patients, full CT Image
//! headers with the identifying content real files carry, and a chest phantom as pixel data.
//!
//! This module owns the generator used by `medledger demo` (when no input is given), by the
//! benchmarks and by tests. Everything is deterministic: the same patient and spec give the same
//! bytes on every machine, so tests can compare hashes and benchmarks are repeatable.
//!
//! Every name, address and number here is invented from small built-in lists. Names are ASCII on
//! purpose: the files declare ISO_IR 100 (Latin-1), and an ASCII identifier has the same bytes in
//! Latin-1 and UTF-8, so a byte-level search for it works no matter how a reader decodes text.

use std::f64::consts::PI;

use dicom_core::value::DataSetSequence;
use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::{DefaultDicomObject, InMemDicomObject, meta::FileMetaTableBuilder};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};
use time::{Date, Duration, Month, PrimitiveDateTime, Time};

/// Private creator of the vendor block every synthetic slice carries (group 0009).
pub const VENDOR_PRIVATE_CREATOR: &str = "ACME CT 1.0";
/// Group of the vendor private block.
pub const VENDOR_PRIVATE_GROUP: u16 = 0x0009;
/// Tag of the vendor private element that repeats the patient's name, as some vendors do.
/// The creator is the first one in its group, so it reserves block 0x10.
pub const VENDOR_PATIENT_NAME_TAG: Tag = Tag(0x0009, 0x1010);
/// Tag of the vendor private element holding a harmless numeric value.
pub const VENDOR_NUMERIC_TAG: Tag = Tag(0x0009, 0x1020);

const IMPLEMENTATION_VERSION_NAME: &str = "MEDLEDGER_TK_01";

/// Detached Study Management SOP Class: retired, but still what many scanners put in Referenced
/// Study Sequence, so the synthetic files do too.
const DETACHED_STUDY_MANAGEMENT_SOP_CLASS: &str = "1.2.840.10008.3.1.2.3.1";

/// A fake patient: demographics as a registration system would hold them.
#[derive(Debug, Clone, PartialEq)]
pub struct FakePatient {
    /// DICOM PN, `FAMILY^GIVEN`.
    pub name: String,
    /// Medical record number, the value of Patient ID.
    pub id: String,
    /// `YYYYMMDD`.
    pub birth_date: String,
    /// `M` or `F`.
    pub sex: String,
    /// One line, at most 64 characters (fits LO).
    pub address: String,
    /// At most 16 characters (fits SH).
    pub phone: String,
    /// Identifiers issued by other authorities; each pairs with [`OTHER_ID_ISSUERS`] by index.
    pub other_ids: Vec<String>,
    /// Height in metres (Patient's Size).
    pub height_m: f64,
    /// Weight in kilograms (Patient's Weight).
    pub weight_kg: f64,
}

/// Issuers of [`FakePatient::other_ids`], in the same order.
pub const OTHER_ID_ISSUERS: [&str; 2] = ["NATIONAL HEALTH ID", "BLUE RIVER INSURANCE"];

#[rustfmt::skip]
const FAMILY_NAMES: &[&str] = &[
    "SMITH", "JOHNSON", "WILLIAMS", "BROWN", "JONES", "GARCIA", "MILLER", "DAVIS", "RODRIGUEZ",
    "MARTINEZ", "HERNANDEZ", "LOPEZ", "WILSON", "ANDERSON", "THOMAS", "TAYLOR", "MOORE", "JACKSON",
    "MARTIN", "LEE", "THOMPSON", "WHITE", "HARRIS", "CLARK", "LEWIS", "ROBINSON", "WALKER",
    "YOUNG", "ALLEN", "KING", "WRIGHT", "SCOTT", "NGUYEN", "HILL", "FLORES", "GREEN", "ADAMS",
    "NELSON", "BAKER", "HALL", "OKAFOR", "KOWALSKI", "LINDQVIST", "MORETTI", "TANAKA",
];
#[rustfmt::skip]
const MALE_GIVEN: &[&str] = &[
    "JAMES", "ROBERT", "JOHN", "MICHAEL", "DAVID", "WILLIAM", "RICHARD", "JOSEPH", "THOMAS",
    "CHARLES", "DANIEL", "MATTHEW", "ANTHONY", "MARK", "DONALD", "STEVEN", "PAUL", "ANDREW",
    "KENNETH", "GEORGE", "EDWARD", "RONALD",
];
#[rustfmt::skip]
const FEMALE_GIVEN: &[&str] = &[
    "MARY", "PATRICIA", "JENNIFER", "LINDA", "ELIZABETH", "BARBARA", "SUSAN", "JESSICA", "SARAH",
    "KAREN", "NANCY", "MARGARET", "LISA", "BETTY", "DOROTHY", "SANDRA", "ASHLEY", "KIMBERLY",
    "DONNA", "CAROL", "HELEN", "RUTH",
];
#[rustfmt::skip]
const STREETS: &[&str] = &[
    "MAPLE", "OAK", "CEDAR", "ELM", "PINE", "WILLOW", "LAKEVIEW", "HILLCREST", "SUNSET",
    "RIVERSIDE", "PARK", "MEADOW", "HIGHLAND", "ORCHARD", "CHESTNUT",
];
const STREET_KINDS: &[&str] = &["STREET", "AVENUE", "ROAD", "LANE", "DRIVE", "COURT"];
const CITIES: &[(&str, &str, u32)] = &[
    ("SPRINGFIELD", "IL", 62704),
    ("RIVERSIDE", "CA", 92501),
    ("FAIRVIEW", "TN", 37062),
    ("GREENVILLE", "SC", 29601),
    ("MADISON", "WI", 53703),
    ("SALEM", "OR", 97301),
    ("CLINTON", "IA", 52732),
    ("GEORGETOWN", "TX", 78626),
];

impl FakePatient {
    /// A deterministic, plausible patient for `seed`: lung-screening age (born 1940 to 1975),
    /// a name, MRN, address, phone and two other IDs from the built-in lists.
    pub fn generate(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(splitmix64(seed ^ 0x5041_5449_454e_5400));
        let female = rng.gen_bool(0.5);
        let family = pick(&mut rng, FAMILY_NAMES);
        let given = pick(&mut rng, if female { FEMALE_GIVEN } else { MALE_GIVEN });
        let birth = days_after(
            Date::from_calendar_date(1940, Month::January, 1).expect("valid date"),
            rng.gen_range(0..36 * 365),
        );
        let (city, state, zip) = CITIES[rng.gen_range(0..CITIES.len())];
        let address = format!(
            "{} {} {}, {}, {} {}",
            rng.gen_range(1..9900),
            pick(&mut rng, STREETS),
            pick(&mut rng, STREET_KINDS),
            city,
            state,
            zip
        );
        let phone = format!(
            "+1-555-{:03}-{:04}",
            rng.gen_range(100..1000),
            rng.gen_range(0..10000)
        );
        let other_ids = vec![
            format!("{:010}", rng.gen_range(1_000_000_000u64..10_000_000_000)),
            format!("BRI-{:08}", rng.gen_range(0..100_000_000u32)),
        ];
        let (height_m, weight_kg): (f64, f64) = if female {
            (rng.gen_range(1.50..1.80), rng.gen_range(48.0..100.0))
        } else {
            (rng.gen_range(1.62..1.95), rng.gen_range(58.0..120.0))
        };
        FakePatient {
            name: format!("{family}^{given}"),
            id: format!("MRN{:08}", rng.gen_range(0..100_000_000u32)),
            birth_date: fmt_date(birth),
            sex: if female { "F" } else { "M" }.to_string(),
            address,
            phone,
            other_ids,
            height_m: (height_m * 100.0_f64).round() / 100.0,
            weight_kg: weight_kg.round(),
        }
    }
}

/// What to generate: one CT series of one study, and the site details that go in its headers.
#[derive(Debug, Clone, PartialEq)]
pub struct CtStudySpec {
    /// `YYYYMMDD`.
    pub study_date: String,
    /// `HHMMSS`.
    pub study_time: String,
    pub slices: u32,
    pub rows: u16,
    pub columns: u16,
    /// Reconstruction field of view (mm); pixel spacing is this divided by rows / columns.
    pub fov_mm: f64,
    /// Slice thickness, also the step of Image Position (Patient) along z (mm).
    pub slice_thickness_mm: f64,
    /// Drives UIDs (together with the patient and accession) and the image noise.
    pub seed: u64,
    pub institution: String,
    pub institution_address: String,
    /// At most 16 characters (SH).
    pub accession: String,
    /// At most 16 characters (SH).
    pub study_id: String,
    pub study_description: String,
    pub series_description: String,
    pub series_number: u32,
    pub referring_physician: String,
    pub performing_physician: String,
    pub operator: String,
    /// At most 16 characters (SH).
    pub station_name: String,
    pub device_serial: String,
}

impl Default for CtStudySpec {
    /// A 64-slice, 512x512, 5 mm low-dose chest CT at a fixed site and date.
    fn default() -> Self {
        CtStudySpec {
            study_date: "20240315".into(),
            study_time: "091530".into(),
            slices: 64,
            rows: 512,
            columns: 512,
            fov_mm: 360.0,
            slice_thickness_mm: 5.0,
            seed: 1,
            institution: "RIVERSIDE GENERAL HOSPITAL".into(),
            institution_address: "1200 HARBOUR ROAD, RIVERSIDE, CA 92501".into(),
            accession: "RGH2403150017".into(),
            study_id: "CT-0017".into(),
            study_description: "CT CHEST LOW DOSE SCREENING".into(),
            series_description: "THORAX 5.0 B30F".into(),
            series_number: 2,
            referring_physician: "CARTER^HELEN^^DR".into(),
            performing_physician: "OKAFOR^DANIEL".into(),
            operator: "NGUYEN^LINH".into(),
            station_name: "RGHCT01".into(),
            device_serial: "ACT128-04417".into(),
        }
    }
}

const SITES: &[(&str, &str, &str)] = &[
    (
        "RIVERSIDE GENERAL HOSPITAL",
        "1200 HARBOUR ROAD, RIVERSIDE, CA 92501",
        "RGH",
    ),
    (
        "SAINT BRIGID MEDICAL CENTER",
        "45 CATHEDRAL AVENUE, MADISON, WI 53703",
        "SBM",
    ),
    (
        "NORTHGATE IMAGING CENTRE",
        "9 NORTHGATE PARKWAY, SALEM, OR 97301",
        "NIC",
    ),
    (
        "LAKESHORE UNIVERSITY HOSPITAL",
        "300 SHORE DRIVE, CLINTON, IA 52732",
        "LUH",
    ),
];

impl CtStudySpec {
    /// Like [`Default`] (64 slices, 512x512) but with the site, date (2019 to 2023, never
    /// 29 February), time, accession and staff varied by `seed`, for when many distinct studies
    /// are needed (demo, benchmarks).
    pub fn for_seed(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(splitmix64(seed ^ 0x5354_5544_5953_5045));
        let (institution, address, code) = SITES[rng.gen_range(0..SITES.len())];
        let mut date = days_after(
            Date::from_calendar_date(2019, Month::January, 1).expect("valid date"),
            rng.gen_range(0..5 * 365),
        );
        // Never 29 February, so callers can move the date by whole years (screening rounds).
        if (date.month(), date.day()) == (Month::February, 29) {
            date = date
                .previous_day()
                .expect("not the first representable date");
        }
        let time = Time::from_hms(
            rng.gen_range(7..18),
            rng.gen_range(0..60),
            rng.gen_range(0..60),
        )
        .expect("valid time");
        let number = rng.gen_range(1..10_000u32);
        let person = |rng: &mut StdRng| {
            let given = if rng.gen_bool(0.5) {
                pick(rng, MALE_GIVEN)
            } else {
                pick(rng, FEMALE_GIVEN)
            };
            format!("{}^{}", pick(rng, FAMILY_NAMES), given)
        };
        let referring = format!("{}^^DR", person(&mut rng));
        let performing = person(&mut rng);
        let operator = person(&mut rng);
        CtStudySpec {
            accession: format!("{code}{}{number:04}", &fmt_date(date)[2..]),
            study_id: format!("CT-{number:04}"),
            study_date: fmt_date(date),
            study_time: fmt_time(time),
            seed,
            institution: institution.into(),
            institution_address: address.into(),
            referring_physician: referring,
            performing_physician: performing,
            operator,
            station_name: format!("{code}CT0{}", rng.gen_range(1..4)),
            device_serial: format!("ACT128-{:05}", rng.gen_range(0..100_000)),
            ..CtStudySpec::default()
        }
    }
}

/// One CT series: Part 10 files (preamble, file meta, Explicit VR Little Endian data set) as
/// bytes, in slice order (superior to inferior).
///
/// Panics if the spec's date or time is not `YYYYMMDD` / `HHMMSS`, or a dimension is zero.
pub fn ct_study(patient: &FakePatient, spec: &CtStudySpec) -> Vec<Vec<u8>> {
    ct_study_objects(patient, spec)
        .iter()
        .map(to_part10_bytes)
        .collect()
}

/// Same as [`ct_study`] but as dicom-rs objects (file meta included), for tests that want to
/// tweak before encoding.
pub fn ct_study_objects(patient: &FakePatient, spec: &CtStudySpec) -> Vec<DefaultDicomObject> {
    let study = StudyContext::new(patient, spec);
    let mut phantom = Phantom::new(patient, spec);
    (0..spec.slices)
        .map(|k| {
            let pixels = phantom.render(k);
            study
                .slice_dataset(patient, spec, k, pixels)
                .with_meta(part10_meta())
                .expect("SOP Class and Instance UIDs are set")
        })
        .collect()
}

/// Encodes a file object (preamble, meta, data set) with its own transfer syntax.
///
/// Panics if dicom-rs cannot encode it, which for objects built here would be a bug.
pub fn to_part10_bytes(obj: &DefaultDicomObject) -> Vec<u8> {
    // Pixel data dominates; reserve for it and a generous header so the buffer grows at most
    // once.
    let pixel_bytes = obj
        .get(tags::PIXEL_DATA)
        .map_or(0, |e| e.header().len.0 as usize);
    let mut out = Vec::with_capacity(pixel_bytes + 16 * 1024);
    obj.write_all(&mut out).expect("encode DICOM file");
    out
}

/// File meta builder for Explicit VR Little Endian with this kit's implementation identity;
/// `with_meta` fills Media Storage SOP Class/Instance UID from the data set.
pub(crate) fn part10_meta() -> FileMetaTableBuilder {
    FileMetaTableBuilder::new()
        .transfer_syntax(uids::EXPLICIT_VR_LITTLE_ENDIAN)
        .implementation_class_uid(derive_uid("implementation", "medledger-testkit"))
        .implementation_version_name(IMPLEMENTATION_VERSION_NAME)
}

/// A UID under the `2.25` root (PS3.5 B.2): the decimal form of 128 bits of
/// SHA-256(`namespace` NUL `key`). Deterministic, and distinct for distinct inputs for all
/// practical purposes.
pub fn derive_uid(namespace: &str, key: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"medledger-testkit\0");
    h.update(namespace.as_bytes());
    h.update([0]);
    h.update(key.as_bytes());
    let digest = h.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    // Never zero, so the integer has no leading zero and the UID stays valid.
    let n = u128::from_be_bytes(bytes).max(1);
    format!("2.25.{n}")
}

/// Whether `uid` is a syntactically valid UID (PS3.5 9.1): at most 64 characters, components
/// of digits separated by single dots, no component with a leading zero (except "0" itself).
pub fn is_valid_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= 64
        && uid.split('.').all(|c| {
            !c.is_empty()
                && c.bytes().all(|b| b.is_ascii_digit())
                && (c == "0" || !c.starts_with('0'))
        })
}

/// Puts attributes given as `TAG VR = value;` lines (tags by their `tags::` constant names) into
/// a data set: header-building code then reads like the module tables of PS3.3.
macro_rules! put_attrs {
    ($obj:expr, { $($tag:ident $vr:ident = $value:expr;)* }) => {
        { $( put($obj, tags::$tag, VR::$vr, $value); )* }
    };
}

/// Everything about the study that is the same for every slice.
struct StudyContext {
    study_uid: String,
    series_uid: String,
    frame_of_reference_uid: String,
    referenced_study_uid: String,
    irradiation_event_uid: String,
    instance_uids: Vec<String>,
    study_start: PrimitiveDateTime,
    patient_age: String,
    calibration: PrimitiveDateTime,
    row_spacing: f64,
    col_spacing: f64,
}

impl StudyContext {
    fn new(patient: &FakePatient, spec: &CtStudySpec) -> Self {
        assert!(
            spec.slices > 0 && spec.rows > 0 && spec.columns > 0,
            "CtStudySpec needs at least one slice, row and column"
        );
        // The patient and accession are part of the key so that two patients generated with the
        // same spec (the demo does this) still get distinct UIDs.
        let key = format!(
            "{}|{}|{}|{}|{}",
            spec.seed, patient.id, spec.accession, spec.study_date, spec.series_number
        );
        let date = parse_date(&spec.study_date)
            .unwrap_or_else(|| panic!("study_date {:?} is not YYYYMMDD", spec.study_date));
        let time = parse_time(&spec.study_time)
            .unwrap_or_else(|| panic!("study_time {:?} is not HHMMSS", spec.study_time));
        let birth = parse_date(&patient.birth_date)
            .unwrap_or_else(|| panic!("birth_date {:?} is not YYYYMMDD", patient.birth_date));
        StudyContext {
            study_uid: derive_uid("study", &key),
            series_uid: derive_uid("series", &key),
            frame_of_reference_uid: derive_uid("frame-of-reference", &key),
            referenced_study_uid: derive_uid("referenced-study", &key),
            irradiation_event_uid: derive_uid("irradiation-event", &key),
            instance_uids: (0..spec.slices)
                .map(|k| derive_uid("instance", &format!("{key}|{k}")))
                .collect(),
            study_start: PrimitiveDateTime::new(date, time),
            patient_age: age_string(birth, date),
            // Daily warm-up calibration, early on the study day.
            calibration: PrimitiveDateTime::new(
                date,
                Time::from_hms(6, 42, 10).expect("valid time"),
            ),
            row_spacing: spec.fov_mm / f64::from(spec.rows),
            col_spacing: spec.fov_mm / f64::from(spec.columns),
        }
    }

    fn slice_dataset(
        &self,
        patient: &FakePatient,
        spec: &CtStudySpec,
        k: u32,
        pixels: Vec<u16>,
    ) -> InMemDicomObject {
        let mut obj = InMemDicomObject::new_empty();
        let o = &mut obj;
        let study_date = fmt_date(self.study_start.date());
        let study_time = fmt_time(self.study_start.time());
        let series_start = self.study_start + Duration::seconds(95);
        // A helical scan covers the whole chest in a few seconds; each reconstructed slice gets
        // its own acquisition time within that sweep.
        let acquired = series_start + Duration::milliseconds(12_000 + i64::from(k) * 85);
        let content = self.study_start + Duration::seconds(160);
        let created =
            self.study_start + Duration::seconds(171) + Duration::milliseconds(i64::from(k) * 7);
        let z = slice_z(spec.slice_thickness_mm, f64::from(k));
        let x0 = -spec.fov_mm / 2.0 + self.col_spacing / 2.0;
        let y0 = -spec.fov_mm / 2.0 + self.row_spacing / 2.0;

        put_attrs!(o, {
            // SOP Common
            SPECIFIC_CHARACTER_SET CS = "ISO_IR 100";
            IMAGE_TYPE CS = strs(&["ORIGINAL", "PRIMARY", "AXIAL"]);
            INSTANCE_CREATION_DATE DA = fmt_date(created.date());
            INSTANCE_CREATION_TIME TM = fmt_time_frac(created.time());
            SOP_CLASS_UID UI = uids::CT_IMAGE_STORAGE;
            SOP_INSTANCE_UID UI = self.instance_uids[k as usize].as_str();
            TIMEZONE_OFFSET_FROM_UTC SH = "-0800";

            // Patient, Patient Study
            PATIENT_NAME PN = patient.name.as_str();
            PATIENT_ID LO = patient.id.as_str();
            ISSUER_OF_PATIENT_ID LO = spec.institution.as_str();
            PATIENT_BIRTH_DATE DA = patient.birth_date.as_str();
            PATIENT_SEX CS = patient.sex.as_str();
            PATIENT_AGE AS = self.patient_age.as_str();
            PATIENT_SIZE DS = ds(patient.height_m);
            PATIENT_WEIGHT DS = ds(patient.weight_kg);
            PATIENT_ADDRESS LO = patient.address.as_str();
            PATIENT_TELEPHONE_NUMBERS SH = patient.phone.as_str();

            // General Study
            STUDY_INSTANCE_UID UI = self.study_uid.as_str();
            STUDY_DATE DA = study_date.as_str();
            STUDY_TIME TM = study_time.as_str();
            REFERRING_PHYSICIAN_NAME PN = spec.referring_physician.as_str();
            STUDY_ID SH = spec.study_id.as_str();
            ACCESSION_NUMBER SH = spec.accession.as_str();
            STUDY_DESCRIPTION LO = spec.study_description.as_str();

            // General Series
            MODALITY CS = "CT";
            SERIES_INSTANCE_UID UI = self.series_uid.as_str();
            SERIES_NUMBER IS = spec.series_number.to_string();
            SERIES_DATE DA = fmt_date(series_start.date());
            SERIES_TIME TM = fmt_time(series_start.time());
            SERIES_DESCRIPTION LO = spec.series_description.as_str();
            PERFORMING_PHYSICIAN_NAME PN = spec.performing_physician.as_str();
            PROTOCOL_NAME LO = "LDCT LUNG SCREENING";
            OPERATORS_NAME PN = spec.operator.as_str();
            BODY_PART_EXAMINED CS = "CHEST";
            PATIENT_POSITION CS = "HFS";
            PERFORMED_PROCEDURE_STEP_ID SH = format!("PPS{}", spec.study_id);
            PERFORMED_PROCEDURE_STEP_START_DATE DA = study_date.as_str();
            PERFORMED_PROCEDURE_STEP_START_TIME TM = study_time.as_str();
            PERFORMED_PROCEDURE_STEP_DESCRIPTION LO = "CT CHEST LOW DOSE";
            REQUESTED_PROCEDURE_DESCRIPTION LO = "CT CHEST LOW DOSE";

            // Frame of Reference
            FRAME_OF_REFERENCE_UID UI = self.frame_of_reference_uid.as_str();
            POSITION_REFERENCE_INDICATOR LO = "";

            // General Equipment
            MANUFACTURER LO = "ACME MEDICAL SYSTEMS";
            INSTITUTION_NAME LO = spec.institution.as_str();
            INSTITUTION_ADDRESS ST = spec.institution_address.as_str();
            INSTITUTIONAL_DEPARTMENT_NAME LO = "RADIOLOGY";
            STATION_NAME SH = spec.station_name.as_str();
            MANUFACTURER_MODEL_NAME LO = "ACME CT 128";
            DEVICE_SERIAL_NUMBER LO = spec.device_serial.as_str();
            SOFTWARE_VERSIONS LO = "ACME-CT 4.2.1";
            DATE_OF_LAST_CALIBRATION DA = fmt_date(self.calibration.date());
            TIME_OF_LAST_CALIBRATION TM = fmt_time(self.calibration.time());

            // General Image, General Acquisition
            INSTANCE_NUMBER IS = (k + 1).to_string();
            ACQUISITION_NUMBER IS = "1";
            ACQUISITION_DATE DA = fmt_date(acquired.date());
            ACQUISITION_TIME TM = fmt_time_frac(acquired.time());
            ACQUISITION_DATE_TIME DT = fmt_datetime_frac(acquired);
            CONTENT_DATE DA = fmt_date(content.date());
            CONTENT_TIME TM = fmt_time_frac(content.time());
            IMAGES_IN_ACQUISITION IS = spec.slices.to_string();
            IRRADIATION_EVENT_UID UI = self.irradiation_event_uid.as_str();
            BURNED_IN_ANNOTATION CS = "NO";
            LOSSY_IMAGE_COMPRESSION CS = "00";

            // Image Plane
            PIXEL_SPACING DS = strs(&[ds(self.row_spacing), ds(self.col_spacing)]);
            IMAGE_ORIENTATION_PATIENT DS = strs(&["1", "0", "0", "0", "1", "0"]);
            IMAGE_POSITION_PATIENT DS = strs(&[ds(x0), ds(y0), ds(z)]);
            SLICE_THICKNESS DS = ds(spec.slice_thickness_mm);
            SLICE_LOCATION DS = ds(z);

            // Image Pixel: unsigned 12-bit values, HU = stored - 1024.
            SAMPLES_PER_PIXEL US = 1u16;
            PHOTOMETRIC_INTERPRETATION CS = "MONOCHROME2";
            ROWS US = spec.rows;
            COLUMNS US = spec.columns;
            BITS_ALLOCATED US = 16u16;
            BITS_STORED US = 12u16;
            HIGH_BIT US = 11u16;
            PIXEL_REPRESENTATION US = 0u16;

            // CT Image
            RESCALE_INTERCEPT DS = "-1024";
            RESCALE_SLOPE DS = "1";
            RESCALE_TYPE LO = "HU";
            KVP DS = "120";
            DATA_COLLECTION_DIAMETER DS = "500";
            RECONSTRUCTION_DIAMETER DS = ds(spec.fov_mm);
            DISTANCE_SOURCE_TO_DETECTOR DS = "1085.6";
            DISTANCE_SOURCE_TO_PATIENT DS = "595";
            GANTRY_DETECTOR_TILT DS = "0";
            TABLE_HEIGHT DS = "160";
            ROTATION_DIRECTION CS = "CW";
            EXPOSURE_TIME IS = "500";
            X_RAY_TUBE_CURRENT IS = "60";
            EXPOSURE IS = "30";
            FILTER_TYPE SH = "BODY FILTER";
            GENERATOR_POWER IS = "7";
            FOCAL_SPOTS DS = "1.2";
            CONVOLUTION_KERNEL SH = "B30F";
            REVOLUTION_TIME FD = 0.5f64;
            SINGLE_COLLIMATION_WIDTH FD = 0.6f64;
            TOTAL_COLLIMATION_WIDTH FD = 38.4f64;
            TABLE_SPEED FD = 76.8f64;
            TABLE_FEED_PER_ROTATION FD = 38.4f64;
            SPIRAL_PITCH_FACTOR FD = 1.0f64;
            CTD_IVOL FD = 1.4f64;

            // VOI LUT: lung and mediastinal windows.
            WINDOW_CENTER DS = strs(&["-600", "40"]);
            WINDOW_WIDTH DS = strs(&["1500", "400"]);
            WINDOW_CENTER_WIDTH_EXPLANATION LO = strs(&["LUNG", "MEDIASTINUM"]);
        });

        put_seq(
            o,
            tags::OTHER_PATIENT_I_DS_SEQUENCE,
            patient
                .other_ids
                .iter()
                .zip(OTHER_ID_ISSUERS)
                .map(|(id, issuer)| {
                    item(|i| {
                        put_attrs!(i, {
                            PATIENT_ID LO = id.as_str();
                            ISSUER_OF_PATIENT_ID LO = issuer;
                            TYPE_OF_PATIENT_ID CS = "TEXT";
                        })
                    })
                })
                .collect(),
        );
        let referenced_study = item(|i| {
            put_attrs!(i, {
                REFERENCED_SOP_CLASS_UID UI = DETACHED_STUDY_MANAGEMENT_SOP_CLASS;
                REFERENCED_SOP_INSTANCE_UID UI = self.referenced_study_uid.as_str();
            })
        });
        put_seq(o, tags::REFERENCED_STUDY_SEQUENCE, vec![referenced_study]);
        if k > 0 {
            // Reconstruction software often records the neighbouring slice it was derived from.
            let source = item(|i| {
                put_attrs!(i, {
                    REFERENCED_SOP_CLASS_UID UI = uids::CT_IMAGE_STORAGE;
                    REFERENCED_SOP_INSTANCE_UID UI = self.instance_uids[k as usize - 1].as_str();
                })
            });
            put_seq(o, tags::SOURCE_IMAGE_SEQUENCE, vec![source]);
        }
        // Request Attributes: what the RIS scheduled, nested with the protocol code.
        let protocol = item(|c| {
            put_attrs!(c, {
                CODE_VALUE SH = "LDCT01";
                CODING_SCHEME_DESIGNATOR SH = "99ACME";
                CODE_MEANING LO = "Low dose CT lung screening";
            })
        });
        let request = item(|i| {
            put_attrs!(i, {
                ACCESSION_NUMBER SH = spec.accession.as_str();
                REQUESTED_PROCEDURE_ID SH = format!("RP{}", spec.accession);
                REQUESTED_PROCEDURE_DESCRIPTION LO = "CT CHEST LOW DOSE";
                SCHEDULED_PROCEDURE_STEP_ID SH = format!("SPS{}", spec.study_id);
                SCHEDULED_PROCEDURE_STEP_DESCRIPTION LO = "LDCT LUNG SCREENING";
            });
            put_seq(i, tags::SCHEDULED_PROTOCOL_CODE_SEQUENCE, vec![protocol]);
        });
        put_seq(o, tags::REQUEST_ATTRIBUTES_SEQUENCE, vec![request]);

        // Vendor private block: a copy of the patient's name (vendors do this) and a harmless
        // reconstruction parameter. Written by hand rather than with `put_private_element`:
        // dicom-rs 0.10 reserves the first block of an empty group at (gggg,0001), which
        // PS3.5 7.8.1 does not allow (creators live in (gggg,0010-00FF)); block 0x10 is what
        // scanners use.
        put(
            o,
            Tag(VENDOR_PRIVATE_GROUP, 0x0010),
            VR::LO,
            VENDOR_PRIVATE_CREATOR,
        );
        put(o, VENDOR_PATIENT_NAME_TAG, VR::LO, patient.name.as_str());
        put(o, VENDOR_NUMERIC_TAG, VR::DS, "0.65");

        put(
            o,
            tags::PIXEL_DATA,
            VR::OW,
            PrimitiveValue::U16(pixels.into()),
        );
        obj
    }
}

/// z (mm) of slice `k` (fractional for positions between slices): the series starts 40 mm
/// below the table origin and steps inferiorly.
fn slice_z(slice_thickness_mm: f64, k: f64) -> f64 {
    -40.0 - k * slice_thickness_mm
}

// ---------------------------------------------------------------------------------------------
// The chest phantom
// ---------------------------------------------------------------------------------------------

/// Hounsfield units of the phantom's tissues.
mod hu {
    pub const OUTSIDE_SCAN: i16 = -1024;
    pub const AIR: i16 = -1000;
    pub const LUNG: i16 = -850;
    pub const FAT: i16 = -100;
    pub const DISC: i16 = 80;
    pub const SOFT: i16 = 40;
    pub const BLOOD: i16 = 45;
    pub const LIVER: i16 = 55;
    pub const CSF: i16 = 15;
    pub const VESSEL: i16 = 30;
    pub const NODULE: i16 = 35;
    pub const TABLE: i16 = 150;
    pub const CANCELLOUS: i16 = 350;
    pub const STERNUM: i16 = 500;
    pub const BONE: i16 = 700;
}

/// An axis-aligned ellipse (or rectangle) in patient millimetres, painted with one value.
#[derive(Debug, Clone, Copy)]
struct Shape {
    cx: f64,
    cy: f64,
    a: f64,
    b: f64,
    rect: bool,
    hu: i16,
}

impl Shape {
    fn ellipse(cx: f64, cy: f64, a: f64, b: f64, hu: i16) -> Self {
        Shape {
            cx,
            cy,
            a,
            b,
            rect: false,
            hu,
        }
    }
    fn circle(cx: f64, cy: f64, r: f64, hu: i16) -> Self {
        Self::ellipse(cx, cy, r, r, hu)
    }
    /// Half-width of the shape on the row at height `y`, if it reaches that row.
    fn half_width_at(&self, y: f64) -> Option<f64> {
        let dy = y - self.cy;
        if self.a <= 0.0 || self.b <= 0.0 || dy.abs() >= self.b {
            return None;
        }
        if self.rect {
            Some(self.a)
        } else {
            let q = dy / self.b;
            Some(self.a * (1.0 - q * q).sqrt())
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Nodule {
    /// Which lung: -1 right (patient's right is image left, -x), +1 left.
    side: f64,
    /// Position inside the lung as a fraction of its semi-axes.
    u: f64,
    v: f64,
    z: f64,
    r: f64,
}

/// Renders slices of a chest phantom by scanlines: each shape is turned into one column
/// interval per row (one square root per shape and row), so the cost per pixel is a write and a
/// noise step, not a geometry test.
struct Phantom {
    rows: usize,
    cols: usize,
    fov: f64,
    row_spacing: f64,
    col_spacing: f64,
    /// Scale of the anatomy to the field of view (anatomy is drawn for a 360 mm FOV).
    sf: f64,
    /// Body habitus, from the patient's weight: 1.0 for 80 kg.
    habitus: f64,
    slices: u32,
    slice_thickness: f64,
    noise_seed: u64,
    nodules: Vec<Nodule>,
    shapes: Vec<Shape>,
    row_hu: Vec<i16>,
}

impl Phantom {
    fn new(patient: &FakePatient, spec: &CtStudySpec) -> Self {
        // Anatomy (nodules) follows the patient, so two screening rounds show the same findings.
        let mut rng = StdRng::seed_from_u64(splitmix64(hash64(patient.id.as_bytes())));
        let slices = spec.slices;
        let nodules = (0..rng.gen_range(2..5))
            .map(|_| {
                let t = rng.gen_range(0.30..0.80);
                Nodule {
                    side: if rng.gen_bool(0.5) { 1.0 } else { -1.0 },
                    u: rng.gen_range(-0.5..0.5),
                    v: rng.gen_range(-0.5..0.5),
                    z: slice_z(
                        spec.slice_thickness_mm,
                        t * f64::from(slices.saturating_sub(1)),
                    ),
                    r: rng.gen_range(2.5..7.0),
                }
            })
            .collect();
        Phantom {
            rows: usize::from(spec.rows),
            cols: usize::from(spec.columns),
            fov: spec.fov_mm,
            row_spacing: spec.fov_mm / f64::from(spec.rows),
            col_spacing: spec.fov_mm / f64::from(spec.columns),
            sf: spec.fov_mm / 360.0,
            habitus: (0.85 + 0.15 * (patient.weight_kg - 50.0) / 40.0).clamp(0.8, 1.1),
            slices,
            slice_thickness: spec.slice_thickness_mm,
            noise_seed: splitmix64(spec.seed ^ hash64(patient.id.as_bytes())),
            nodules,
            shapes: Vec::with_capacity(64),
            row_hu: vec![0; usize::from(spec.columns)],
        }
    }

    /// Lays out the shapes of slice `k` in paint order (later shapes cover earlier ones).
    fn layout(&mut self, k: u32) {
        let sf = self.sf;
        let z = slice_z(self.slice_thickness, f64::from(k));
        // Position along the chest, 0 at the apex (first slice) to 1 at the bases.
        let t = if self.slices > 1 {
            f64::from(k) / f64::from(self.slices - 1)
        } else {
            0.5
        };
        let bump = |centre: f64, width: f64| {
            let d = (t - centre) / width;
            (1.0 - d * d).max(0.0).sqrt()
        };
        let s = &mut self.shapes;
        s.clear();

        let table_top = 135.0 * sf;
        s.push(Shape {
            cx: 0.0,
            cy: table_top + 6.0 * sf,
            a: 210.0 * sf,
            b: 6.0 * sf,
            rect: true,
            hu: hu::TABLE,
        });

        // Body: fat rim around muscle and organs; the chest is widest mid-way.
        let widen = 0.93 + 0.07 * (PI * t).sin();
        let body_a = 160.0 * sf * self.habitus * widen;
        let body_b = 112.0 * sf * self.habitus * widen;
        let body_cy = table_top - body_b - 1.0 * sf;
        let rim = 9.0 * sf * self.habitus;
        s.push(Shape::ellipse(0.0, body_cy, body_a, body_b, hu::FAT));
        let (in_a, in_b) = (body_a - rim, body_b - rim);
        s.push(Shape::ellipse(0.0, body_cy, in_a, in_b, hu::SOFT));

        // Lungs: small at the apex, largest in the middle, pushed up by the diaphragm at the base.
        let lung = (PI * (0.06 + 0.88 * t)).sin().max(0.0).sqrt();
        let lungs = [
            (-1.0, 0.43 * in_a, 0.37 * in_a * lung, 0.78 * in_b * lung),
            (1.0, 0.41 * in_a, 0.35 * in_a * lung, 0.76 * in_b * lung),
        ];
        let lung_cy = body_cy - 0.05 * in_b;
        for &(side, cx, a, b) in &lungs {
            s.push(Shape::ellipse(side * cx, lung_cy, a, b, hu::LUNG));
        }
        // Pulmonary vessels drift slowly across slices.
        for &(side, cx, a, b) in &lungs {
            for j in 0..5 {
                let phase = f64::from(j) * 1.3 + side;
                let u = 0.55 * (z / 45.0 + phase).sin();
                let v = 0.55 * (z / 60.0 + 2.0 * phase).cos();
                let r = (1.2 + 0.4 * f64::from(j % 3)) * sf;
                s.push(Shape::circle(
                    side * cx + u * a,
                    lung_cy + v * b,
                    r,
                    hu::VESSEL,
                ));
            }
        }
        for n in &self.nodules {
            let dz = z - n.z;
            if dz.abs() < n.r {
                let (_, cx, a, b) = if n.side < 0.0 { lungs[0] } else { lungs[1] };
                let r = (n.r * n.r - dz * dz).sqrt() * sf;
                s.push(Shape::circle(
                    n.side * cx + n.u * a,
                    lung_cy + n.v * b,
                    r,
                    hu::NODULE,
                ));
            }
        }

        // Heart in the lower-middle chest, slightly to the patient's left; liver dome at the
        // right base.
        let heart = bump(0.62, 0.28);
        s.push(Shape::ellipse(
            0.12 * in_a,
            body_cy - 0.25 * in_b,
            0.36 * in_a * heart,
            0.48 * in_b * heart,
            hu::SOFT,
        ));
        let liver = ((t - 0.78) / 0.22).clamp(0.0, 1.0);
        s.push(Shape::ellipse(
            -0.35 * in_a,
            body_cy,
            0.55 * in_a * liver,
            0.75 * in_b * liver,
            hu::LIVER,
        ));
        // Descending aorta beside the spine.
        s.push(Shape::circle(
            0.12 * in_a,
            body_cy + 0.45 * in_b,
            11.0 * sf,
            hu::BLOOD,
        ));

        // Spine: cortical shell, cancellous body (a disc between vertebrae), posterior arch,
        // canal.
        let spine_y = body_cy + 0.62 * in_b;
        let disc = (z / 28.0).rem_euclid(1.0) < 0.18;
        s.push(Shape::circle(
            0.0,
            spine_y,
            18.0 * sf,
            if disc { hu::DISC } else { hu::BONE },
        ));
        if !disc {
            s.push(Shape::circle(0.0, spine_y, 15.0 * sf, hu::CANCELLOUS));
        }
        s.push(Shape::ellipse(
            0.0,
            spine_y + 27.0 * sf,
            7.0 * sf,
            14.0 * sf,
            hu::BONE,
        ));
        s.push(Shape::ellipse(
            0.0,
            spine_y + 27.0 * sf,
            22.0 * sf,
            4.0 * sf,
            hu::BONE,
        ));
        s.push(Shape::circle(0.0, spine_y + 22.0 * sf, 7.0 * sf, hu::CSF));

        // Sternum in the upper and middle chest.
        if (0.12..0.78).contains(&t) {
            s.push(Shape::ellipse(
                0.0,
                body_cy - in_b + 8.0 * sf,
                13.0 * sf,
                6.0 * sf,
                hu::STERNUM,
            ));
        }

        // Ribs run obliquely, so a slice cuts each rib at a few places around the chest wall;
        // which cuts appear shifts smoothly with z.
        if (0.03..0.92).contains(&t) {
            let (ring_a, ring_b) = (in_a - 9.0 * sf, in_b - 9.0 * sf);
            for j in 0..11 {
                let visible = (z / 26.0 + f64::from(j) * 0.37).rem_euclid(1.0) < 0.42;
                if !visible {
                    continue;
                }
                // Angles from beside the spine (posterior, +y) round to the front.
                let phi = (80.0 - 14.0 * f64::from(j)).to_radians();
                let (c, sn) = (phi.cos(), phi.sin());
                for side in [-1.0, 1.0] {
                    let x = side * ring_a * c;
                    let y = body_cy + ring_b * sn;
                    s.push(Shape::ellipse(x, y, 6.0 * sf, 4.5 * sf, hu::BONE));
                }
            }
        }
    }

    /// Stored values (HU + 1024, 12 bits) of slice `k`, row by row.
    fn render(&mut self, k: u32) -> Vec<u16> {
        self.layout(k);
        let (rows, cols) = (self.rows, self.cols);
        let mut out = vec![0u16; rows * cols];
        let radius = self.fov / 2.0;
        let scan = Shape::circle(0.0, 0.0, radius, hu::AIR);
        for r in 0..rows {
            let y = (r as f64 + 0.5) * self.row_spacing - self.fov / 2.0;
            let line = &mut self.row_hu;
            line.fill(hu::OUTSIDE_SCAN);
            // Only the reconstruction circle is inside the scan; outside it stays -1024.
            let Some((lo, hi)) = span(&scan, y, self.col_spacing, self.fov, cols) else {
                continue;
            };
            line[lo..=hi].fill(hu::AIR);
            for shape in &self.shapes {
                if let Some((a, b)) = span(shape, y, self.col_spacing, self.fov, cols) {
                    let (a, b) = (a.max(lo), b.min(hi));
                    if a <= b {
                        line[a..=b].fill(shape.hu);
                    }
                }
            }
            let mut state = splitmix64(self.noise_seed ^ (u64::from(k) << 32) ^ (r as u64)) | 1;
            let row_out = &mut out[r * cols..(r + 1) * cols];
            for c in lo..=hi {
                // xorshift64: sum of three 4-bit fields is a cheap, roughly bell-shaped noise
                // of about +-8 HU standard deviation.
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let noise = (state & 15) + ((state >> 4) & 15) + ((state >> 8) & 15);
                let v = i32::from(line[c]) + 1024 + noise as i32 - 22;
                row_out[c] = v.clamp(0, 4095) as u16;
            }
        }
        out
    }
}

/// Columns covered by `shape` on the row at height `y` (inclusive), if any.
fn span(shape: &Shape, y: f64, spacing: f64, fov: f64, cols: usize) -> Option<(usize, usize)> {
    let half = shape.half_width_at(y)?;
    // Column c has its centre at x = (c + 0.5) * spacing - fov / 2.
    let to_col = |x: f64| (x + fov / 2.0) / spacing - 0.5;
    let first = to_col(shape.cx - half).ceil().max(0.0);
    let last = to_col(shape.cx + half).floor().min(cols as f64 - 1.0);
    (first <= last).then_some((first as usize, last as usize))
}

// ---------------------------------------------------------------------------------------------
// Small helpers shared with `planted`
// ---------------------------------------------------------------------------------------------

pub(crate) fn put(o: &mut InMemDicomObject, tag: Tag, vr: VR, value: impl Into<PrimitiveValue>) {
    o.put(DataElement::new(tag, vr, value.into()));
}

pub(crate) fn put_seq(o: &mut InMemDicomObject, tag: Tag, items: Vec<InMemDicomObject>) {
    o.put(DataElement::new(tag, VR::SQ, DataSetSequence::from(items)));
}

pub(crate) fn item(fill: impl FnOnce(&mut InMemDicomObject)) -> InMemDicomObject {
    let mut i = InMemDicomObject::new_empty();
    fill(&mut i);
    i
}

/// A multi-valued string value.
pub(crate) fn strs<S: AsRef<str>>(values: &[S]) -> PrimitiveValue {
    PrimitiveValue::Strs(values.iter().map(|s| s.as_ref().to_string()).collect())
}

/// Decimal String: up to 6 decimals, trailing zeros dropped, within DS's 16 characters.
pub(crate) fn ds(v: f64) -> String {
    let mut s = format!("{v:.6}");
    if s.contains('.') {
        s.truncate(s.trim_end_matches('0').trim_end_matches('.').len());
    }
    if s == "-0" {
        s = "0".into();
    }
    assert!(s.len() <= 16, "DS value {s} longer than 16 characters");
    s
}

pub(crate) fn fmt_date(d: Date) -> String {
    format!("{:04}{:02}{:02}", d.year(), u8::from(d.month()), d.day())
}

pub(crate) fn fmt_time(t: Time) -> String {
    format!("{:02}{:02}{:02}", t.hour(), t.minute(), t.second())
}

fn fmt_time_frac(t: Time) -> String {
    format!("{}.{:06}", fmt_time(t), t.microsecond())
}

fn fmt_datetime_frac(dt: PrimitiveDateTime) -> String {
    format!("{}{}", fmt_date(dt.date()), fmt_time_frac(dt.time()))
}

pub(crate) fn parse_date(s: &str) -> Option<Date> {
    if s.len() != 8 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let year: i32 = s[0..4].parse().ok()?;
    let month: u8 = s[4..6].parse().ok()?;
    let day: u8 = s[6..8].parse().ok()?;
    Date::from_calendar_date(year, Month::try_from(month).ok()?, day).ok()
}

fn parse_time(s: &str) -> Option<Time> {
    if s.len() != 6 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Time::from_hms(
        s[0..2].parse().ok()?,
        s[2..4].parse().ok()?,
        s[4..6].parse().ok()?,
    )
    .ok()
}

pub(crate) fn days_after(start: Date, days: i64) -> Date {
    start + Duration::days(days)
}

/// Age String (AS) of someone born on `birth` at `on`: whole years, `nnnY`.
pub(crate) fn age_string(birth: Date, on: Date) -> String {
    let mut years = on.year() - birth.year();
    if (u8::from(on.month()), on.day()) < (u8::from(birth.month()), birth.day()) {
        years -= 1;
    }
    format!("{:03}Y", years.clamp(0, 999))
}

fn pick<'a>(rng: &mut StdRng, list: &[&'a str]) -> &'a str {
    list[rng.gen_range(0..list.len())]
}

/// SplitMix64 finaliser: spreads nearby seeds (1, 2, 3...) over the whole 64-bit space.
pub(crate) fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn hash64(bytes: &[u8]) -> u64 {
    let digest = Sha256::digest(bytes);
    let mut b = [0u8; 8];
    b.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(b)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use dicom_object::mem::InMemElement;

    /// Every UI value in `obj`, at any depth.
    pub(crate) fn uid_values(obj: &InMemDicomObject, out: &mut Vec<String>) {
        for e in obj.iter() {
            if let Some(items) = e.items() {
                for i in items {
                    uid_values(i, out);
                }
            } else if e.vr() == VR::UI {
                let s = e.value().to_str().expect("UI value is text").into_owned();
                out.extend(s.split('\\').map(str::to_string));
            }
        }
    }

    pub(crate) fn text(obj: &InMemDicomObject, tag: Tag) -> String {
        obj.get(tag)
            .unwrap_or_else(|| panic!("{tag} missing"))
            .value()
            .to_str()
            .expect("text value")
            .into_owned()
    }

    fn small_spec() -> CtStudySpec {
        CtStudySpec {
            slices: 6,
            rows: 64,
            columns: 96,
            ..CtStudySpec::for_seed(3)
        }
    }

    fn parse(bytes: &[u8]) -> DefaultDicomObject {
        dicom_object::from_reader(bytes).expect("generated file parses")
    }

    fn u16_pixels(e: &InMemElement) -> Vec<u16> {
        match e.value().primitive() {
            Some(PrimitiveValue::U16(v)) => v.to_vec(),
            other => panic!("pixel data is not OW words: {other:?}"),
        }
    }

    #[test]
    fn files_parse_back_and_reencode_to_the_same_bytes() {
        let patient = FakePatient::generate(11);
        let files = ct_study(&patient, &small_spec());
        assert_eq!(files.len(), 6);
        for bytes in &files {
            assert_eq!(&bytes[128..132], b"DICM", "preamble then magic");
            let obj = parse(bytes);
            assert_eq!(
                obj.meta().transfer_syntax(),
                uids::EXPLICIT_VR_LITTLE_ENDIAN
            );
            assert_eq!(
                obj.meta().media_storage_sop_instance_uid(),
                text(&obj, tags::SOP_INSTANCE_UID)
            );
            assert_eq!(to_part10_bytes(&obj), *bytes, "parse + encode round-trips");
        }
    }

    #[test]
    fn files_open_from_disk() {
        let patient = FakePatient::generate(12);
        let files = ct_study(
            &patient,
            &CtStudySpec {
                slices: 1,
                rows: 32,
                columns: 32,
                ..CtStudySpec::default()
            },
        );
        let path = std::env::temp_dir().join(format!("medledger-synth-{}.dcm", std::process::id()));
        std::fs::write(&path, &files[0]).expect("write temp file");
        let opened = dicom_object::open_file(&path);
        std::fs::remove_file(&path).expect("remove temp file");
        let obj = opened.expect("open_file reads the generated file");
        assert_eq!(text(&obj, tags::PATIENT_NAME), patient.name);
    }

    #[test]
    fn objects_encode_to_the_study_bytes() {
        let patient = FakePatient::generate(4);
        let spec = small_spec();
        let from_objects: Vec<Vec<u8>> = ct_study_objects(&patient, &spec)
            .iter()
            .map(to_part10_bytes)
            .collect();
        assert_eq!(from_objects, ct_study(&patient, &spec));
    }

    #[test]
    fn series_headers_are_those_of_one_scanner_series() {
        let patient = FakePatient::generate(21);
        let spec = small_spec();
        let objs = ct_study_objects(&patient, &spec);
        let first = &objs[0];
        let mut sop_uids = std::collections::HashSet::new();
        for (k, o) in objs.iter().enumerate() {
            for tag in [
                tags::STUDY_INSTANCE_UID,
                tags::SERIES_INSTANCE_UID,
                tags::FRAME_OF_REFERENCE_UID,
                tags::PATIENT_NAME,
                tags::ACCESSION_NUMBER,
            ] {
                assert_eq!(text(o, tag), text(first, tag), "{tag} shared by the series");
            }
            assert!(
                sop_uids.insert(text(o, tags::SOP_INSTANCE_UID)),
                "SOP Instance UIDs distinct"
            );
            assert_eq!(text(o, tags::SOP_CLASS_UID), uids::CT_IMAGE_STORAGE);
            assert_eq!(text(o, tags::SPECIFIC_CHARACTER_SET), "ISO_IR 100");
            assert_eq!(text(o, tags::INSTANCE_NUMBER), (k + 1).to_string());
            assert_eq!(text(o, tags::IMAGE_ORIENTATION_PATIENT), "1\\0\\0\\0\\1\\0");
            assert_eq!(
                text(o, tags::PIXEL_SPACING),
                format!("{}\\{}", ds(360.0 / 64.0), ds(360.0 / 96.0))
            );
            let ipp: Vec<f64> = text(o, tags::IMAGE_POSITION_PATIENT)
                .split('\\')
                .map(|v| v.parse().expect("DS number"))
                .collect();
            assert_eq!(ipp.len(), 3);
            let expected_z = -40.0 - k as f64 * spec.slice_thickness_mm;
            assert!(
                (ipp[2] - expected_z).abs() < 1e-6,
                "slice {k} at z {}",
                ipp[2]
            );
            assert_eq!(text(o, tags::SLICE_LOCATION), ds(expected_z));

            let source = o.get(tags::SOURCE_IMAGE_SEQUENCE);
            if k == 0 {
                assert!(source.is_none(), "first slice has no source image");
            } else {
                let items = source
                    .expect("source image sequence")
                    .items()
                    .expect("items");
                assert_eq!(
                    text(&items[0], tags::REFERENCED_SOP_INSTANCE_UID),
                    text(&objs[k - 1], tags::SOP_INSTANCE_UID)
                );
            }
        }
        assert_ne!(
            text(first, tags::STUDY_INSTANCE_UID),
            text(first, tags::SERIES_INSTANCE_UID)
        );
        assert_ne!(
            text(first, tags::SERIES_INSTANCE_UID),
            text(first, tags::FRAME_OF_REFERENCE_UID)
        );
    }

    #[test]
    fn headers_carry_the_identifying_content_of_real_files() {
        let patient = FakePatient::generate(8);
        let spec = CtStudySpec {
            slices: 2,
            rows: 32,
            columns: 32,
            ..CtStudySpec::for_seed(8)
        };
        let obj = ct_study_objects(&patient, &spec).remove(1);
        assert_eq!(text(&obj, tags::PATIENT_ID), patient.id);
        assert_eq!(text(&obj, tags::PATIENT_BIRTH_DATE), patient.birth_date);
        assert_eq!(text(&obj, tags::INSTITUTION_NAME), spec.institution);
        assert_eq!(
            text(&obj, tags::INSTITUTION_ADDRESS),
            spec.institution_address
        );
        assert_eq!(
            text(&obj, tags::REFERRING_PHYSICIAN_NAME),
            spec.referring_physician
        );
        assert_eq!(
            text(&obj, tags::PERFORMING_PHYSICIAN_NAME),
            spec.performing_physician
        );
        assert_eq!(text(&obj, tags::OPERATORS_NAME), spec.operator);
        assert_eq!(text(&obj, tags::STATION_NAME), spec.station_name);
        assert_eq!(text(&obj, tags::DEVICE_SERIAL_NUMBER), spec.device_serial);
        assert_eq!(text(&obj, tags::STUDY_ID), spec.study_id);
        assert_eq!(text(&obj, tags::STUDY_DATE), spec.study_date);
        assert!(text(&obj, tags::ACQUISITION_DATE_TIME).starts_with(&spec.study_date));
        assert_eq!(text(&obj, tags::RESCALE_INTERCEPT), "-1024");
        assert_eq!(text(&obj, tags::RESCALE_SLOPE), "1");

        let birth = parse_date(&patient.birth_date).unwrap();
        let study = parse_date(&spec.study_date).unwrap();
        let mut years = study.year() - birth.year();
        if study.ordinal()
            < birth
                .replace_year(study.year())
                .map(|d| d.ordinal())
                .unwrap_or(60)
        {
            years -= 1;
        }
        assert_eq!(text(&obj, tags::PATIENT_AGE), format!("{years:03}Y"));

        // Vendor private block: creator, the repeated name, a number.
        assert_eq!(
            text(&obj, Tag(VENDOR_PRIVATE_GROUP, 0x0010)),
            VENDOR_PRIVATE_CREATOR
        );
        assert_eq!(text(&obj, VENDOR_PATIENT_NAME_TAG), patient.name);
        assert_eq!(text(&obj, VENDOR_NUMERIC_TAG), "0.65");

        let others = obj
            .get(tags::OTHER_PATIENT_I_DS_SEQUENCE)
            .unwrap()
            .items()
            .unwrap();
        let ids: Vec<String> = others.iter().map(|i| text(i, tags::PATIENT_ID)).collect();
        assert_eq!(ids, patient.other_ids);

        let request = &obj
            .get(tags::REQUEST_ATTRIBUTES_SEQUENCE)
            .unwrap()
            .items()
            .unwrap()[0];
        assert!(!text(request, tags::REQUESTED_PROCEDURE_ID).is_empty());
        assert!(!text(request, tags::SCHEDULED_PROCEDURE_STEP_ID).is_empty());
        assert!(
            request
                .get(tags::SCHEDULED_PROTOCOL_CODE_SEQUENCE)
                .unwrap()
                .items()
                .is_some()
        );
        let study_ref = &obj
            .get(tags::REFERENCED_STUDY_SEQUENCE)
            .unwrap()
            .items()
            .unwrap()[0];
        assert!(is_valid_uid(&text(
            study_ref,
            tags::REFERENCED_SOP_INSTANCE_UID
        )));
    }

    #[test]
    fn every_uid_is_valid() {
        let patient = FakePatient::generate(2);
        let mut all = Vec::new();
        for bytes in ct_study(&patient, &small_spec()) {
            let obj = parse(&bytes);
            uid_values(&obj, &mut all);
            all.push(obj.meta().media_storage_sop_instance_uid().to_string());
            all.push(obj.meta().implementation_class_uid().to_string());
        }
        assert!(all.len() > 6 * 8);
        for uid in &all {
            assert!(is_valid_uid(uid), "invalid UID {uid:?}");
        }
    }

    #[test]
    fn uid_validator_rejects_malformed_uids() {
        assert!(is_valid_uid("1.2.840.10008.5.1.4.1.1.2"));
        assert!(is_valid_uid("2.25.0"));
        assert!(!is_valid_uid(""));
        assert!(!is_valid_uid("1.02.3"));
        assert!(!is_valid_uid("1..2"));
        assert!(!is_valid_uid("1.2."));
        assert!(!is_valid_uid("1.2a"));
        assert!(!is_valid_uid(&format!("2.25.{}", "1".repeat(60))));
        assert!(is_valid_uid(&derive_uid("x", "y")));
        assert_ne!(derive_uid("x", "y"), derive_uid("x", "z"));
        assert_ne!(derive_uid("x", "y"), derive_uid("w", "y"));
    }

    #[test]
    fn same_inputs_give_the_same_bytes_and_different_inputs_do_not() {
        let patient = FakePatient::generate(9);
        let spec = small_spec();
        assert_eq!(ct_study(&patient, &spec), ct_study(&patient, &spec));

        let sop = |p: &FakePatient, s: &CtStudySpec| -> Vec<String> {
            ct_study_objects(p, s)
                .iter()
                .map(|o| text(o, tags::SOP_INSTANCE_UID))
                .collect()
        };
        let base = sop(&patient, &spec);
        let other_seed = CtStudySpec {
            seed: spec.seed + 1,
            ..spec.clone()
        };
        let other_patient = FakePatient::generate(10);
        for other in [sop(&patient, &other_seed), sop(&other_patient, &spec)] {
            assert!(
                other.iter().all(|u| !base.contains(u)),
                "UIDs must not repeat across studies"
            );
        }
        assert_ne!(ct_study(&patient, &spec), ct_study(&patient, &other_seed));
    }

    #[test]
    fn fake_patients_are_deterministic_and_fit_their_vrs() {
        assert_eq!(FakePatient::generate(5), FakePatient::generate(5));
        let patients: Vec<FakePatient> = (0..200).map(FakePatient::generate).collect();
        let ids: std::collections::HashSet<&str> = patients.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids.len(), patients.len(), "MRNs distinct");
        let names: std::collections::HashSet<&str> =
            patients.iter().map(|p| p.name.as_str()).collect();
        assert!(names.len() > 150, "names vary: {}", names.len());
        for p in &patients {
            let (family, given) = p.name.split_once('^').expect("FAMILY^GIVEN");
            assert!(!family.is_empty() && !given.is_empty() && !given.contains('^'));
            assert!(p.name.is_ascii());
            let birth = parse_date(&p.birth_date).expect("birth date is YYYYMMDD");
            assert!((1940..=1976).contains(&birth.year()));
            assert!(p.sex == "M" || p.sex == "F");
            assert!(p.id.len() <= 64 && p.address.len() <= 64 && p.phone.len() <= 16);
            assert_eq!(p.other_ids.len(), OTHER_ID_ISSUERS.len());
            assert!((1.4..2.0).contains(&p.height_m) && (40.0..130.0).contains(&p.weight_kg));
        }
    }

    #[test]
    fn seeded_specs_fit_their_vrs() {
        for seed in 0..2000 {
            let s = CtStudySpec::for_seed(seed);
            assert!(parse_date(&s.study_date).is_some() && parse_time(&s.study_time).is_some());
            assert!(
                !s.study_date.ends_with("0229"),
                "dates can move by whole years"
            );
            for short in [&s.accession, &s.study_id, &s.station_name] {
                assert!(short.len() <= 16, "{short:?} does not fit SH");
            }
            assert!(s.institution_address.len() <= 1024 && s.institution.len() <= 64);
            assert_eq!((s.slices, s.rows, s.columns), (64, 512, 512));
        }
        let d = CtStudySpec::default();
        assert_eq!((d.slices, d.rows, d.columns), (64, 512, 512));
        assert_ne!(
            CtStudySpec::for_seed(1).accession,
            CtStudySpec::for_seed(2).accession
        );
    }

    #[test]
    fn value_formatting_helpers() {
        assert_eq!(ds(0.703125), "0.703125");
        assert_eq!(ds(5.0), "5");
        assert_eq!(ds(-0.0), "0");
        assert_eq!(ds(-179.6484375), "-179.648438");
        let d = |s: &str| parse_date(s).unwrap();
        assert_eq!(age_string(d("19600229"), d("20240228")), "063Y");
        assert_eq!(age_string(d("19600229"), d("20240229")), "064Y");
        assert_eq!(age_string(d("19600615"), d("20240614")), "063Y");
        assert!(parse_date("20241301").is_none() && parse_date("2024011").is_none());
    }

    /// HU of every pixel of slice `k` in a 256x256 study.
    fn hu_slice(patient: &FakePatient, k: usize) -> Vec<i32> {
        let spec = CtStudySpec {
            slices: 40,
            rows: 256,
            columns: 256,
            ..CtStudySpec::default()
        };
        let objs = ct_study_objects(patient, &spec);
        let o = &objs[k];
        assert_eq!(text(o, tags::BITS_STORED), "12");
        assert_eq!(text(o, tags::PIXEL_REPRESENTATION), "0");
        let px = u16_pixels(o.get(tags::PIXEL_DATA).unwrap());
        assert_eq!(px.len(), 256 * 256);
        assert!(px.iter().all(|&v| v < 4096), "values fit 12 bits");
        px.iter().map(|&v| i32::from(v) - 1024).collect()
    }

    #[test]
    fn pixels_look_like_a_chest() {
        let patient = FakePatient::generate(31);
        let hu = hu_slice(&patient, 22);
        let frac = |lo: i32, hi: i32| {
            hu.iter().filter(|&&v| (lo..=hi).contains(&v)).count() as f64 / hu.len() as f64
        };
        assert_eq!(hu[0], -1024, "outside the reconstruction circle");
        assert!(frac(-1060, -940) > 0.2, "air around the body");
        assert!(frac(-900, -800) > 0.05, "lungs: {}", frac(-900, -800));
        assert!(frac(-140, -60) > 0.01, "fat rim: {}", frac(-140, -60));
        assert!(frac(0, 80) > 0.10, "soft tissue: {}", frac(0, 80));
        assert!(frac(600, 800) > 0.002, "bone: {}", frac(600, 800));
        // Noise is mild: the air just inside the scan circle stays close to -1000.
        let centre_row = &hu[128 * 256..129 * 256];
        assert!(
            centre_row[3..10]
                .iter()
                .all(|&v| (-1040..=-960).contains(&v))
        );
    }

    #[test]
    fn slices_vary_smoothly_along_z() {
        let patient = FakePatient::generate(32);
        let diff = |a: &[i32], b: &[i32]| -> f64 {
            a.iter()
                .zip(b)
                .map(|(x, y)| f64::from((x - y).abs()))
                .sum::<f64>()
                / a.len() as f64
        };
        let (a, b, far) = (
            hu_slice(&patient, 20),
            hu_slice(&patient, 21),
            hu_slice(&patient, 38),
        );
        assert!(
            diff(&a, &b) * 2.0 < diff(&a, &far),
            "neighbours {} vs far {}",
            diff(&a, &b),
            diff(&a, &far)
        );
    }

    #[test]
    fn the_lungs_hold_nodules() {
        let patient = FakePatient::generate(33);
        let spec = CtStudySpec::default();
        let mut phantom = Phantom::new(&patient, &spec);
        assert!((2..5).contains(&phantom.nodules.len()));
        let slices_with_nodules = (0..spec.slices)
            .filter(|&k| {
                phantom.layout(k);
                phantom.shapes.iter().any(|s| s.hu == hu::NODULE)
            })
            .count();
        assert!(
            slices_with_nodules >= 2,
            "nodules appear in {slices_with_nodules} slices"
        );
    }
}
