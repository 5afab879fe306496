//! The options of the Basic Application Level Confidentiality Profile (PS3.15 E.3), their
//! names on the command line, their columns in Table E.1-1 and their CID 7050 codes.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// One option of PS3.15 E.3. The kebab-case names are the standard's option names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeidOption {
    RetainSafePrivate,
    RetainUids,
    RetainDeviceIdentity,
    RetainInstitutionIdentity,
    RetainPatientCharacteristics,
    RetainLongitudinalFullDates,
    RetainLongitudinalModifiedDates,
    CleanDescriptors,
    CleanStructuredContent,
    CleanGraphics,
    CleanPixelData,
    CleanRecognizableVisualFeatures,
}

impl DeidOption {
    /// Every option, in the order of PS3.15 E.3.
    pub const ALL: [DeidOption; 12] = [
        DeidOption::CleanPixelData,
        DeidOption::CleanRecognizableVisualFeatures,
        DeidOption::CleanGraphics,
        DeidOption::CleanStructuredContent,
        DeidOption::CleanDescriptors,
        DeidOption::RetainLongitudinalFullDates,
        DeidOption::RetainLongitudinalModifiedDates,
        DeidOption::RetainPatientCharacteristics,
        DeidOption::RetainDeviceIdentity,
        DeidOption::RetainUids,
        DeidOption::RetainSafePrivate,
        DeidOption::RetainInstitutionIdentity,
    ];

    /// The command-line name (the standard's option name in kebab case).
    pub fn name(self) -> &'static str {
        match self {
            DeidOption::RetainSafePrivate => "retain-safe-private",
            DeidOption::RetainUids => "retain-uids",
            DeidOption::RetainDeviceIdentity => "retain-device-identity",
            DeidOption::RetainInstitutionIdentity => "retain-institution-identity",
            DeidOption::RetainPatientCharacteristics => "retain-patient-characteristics",
            DeidOption::RetainLongitudinalFullDates => "retain-longitudinal-full-dates",
            DeidOption::RetainLongitudinalModifiedDates => "retain-longitudinal-modified-dates",
            DeidOption::CleanDescriptors => "clean-descriptors",
            DeidOption::CleanStructuredContent => "clean-structured-content",
            DeidOption::CleanGraphics => "clean-graphics",
            DeidOption::CleanPixelData => "clean-pixel-data",
            DeidOption::CleanRecognizableVisualFeatures => "clean-recognizable-visual-features",
        }
    }

    /// The key of this option's column in the Table E.1-1 JSON, if it has one
    /// (the pixel and visual-feature options act on pixels, not on attributes).
    pub fn table_column(self) -> Option<&'static str> {
        Some(match self {
            DeidOption::RetainSafePrivate => "rtnSafePrivOpt",
            DeidOption::RetainUids => "rtnUIDsOpt",
            DeidOption::RetainDeviceIdentity => "rtnDevIdOpt",
            DeidOption::RetainInstitutionIdentity => "rtnInstIdOpt",
            DeidOption::RetainPatientCharacteristics => "rtnPatCharsOpt",
            DeidOption::RetainLongitudinalFullDates => "rtnLongFullDatesOpt",
            DeidOption::RetainLongitudinalModifiedDates => "rtnLongModifDatesOpt",
            DeidOption::CleanDescriptors => "cleanDescOpt",
            DeidOption::CleanStructuredContent => "cleanStructContOpt",
            DeidOption::CleanGraphics => "cleanGraphOpt",
            DeidOption::CleanPixelData | DeidOption::CleanRecognizableVisualFeatures => {
                return None;
            }
        })
    }

    /// Code value in CID 7050 "De-identification Method" (coding scheme DCM).
    pub fn code(self) -> (&'static str, &'static str) {
        match self {
            DeidOption::CleanPixelData => ("113101", "Clean Pixel Data Option"),
            DeidOption::CleanRecognizableVisualFeatures => {
                ("113102", "Clean Recognizable Visual Features Option")
            }
            DeidOption::CleanGraphics => ("113103", "Clean Graphics Option"),
            DeidOption::CleanStructuredContent => ("113104", "Clean Structured Content Option"),
            DeidOption::CleanDescriptors => ("113105", "Clean Descriptors Option"),
            DeidOption::RetainLongitudinalFullDates => (
                "113106",
                "Retain Longitudinal Temporal Information Full Dates Option",
            ),
            DeidOption::RetainLongitudinalModifiedDates => (
                "113107",
                "Retain Longitudinal Temporal Information Modified Dates Option",
            ),
            DeidOption::RetainPatientCharacteristics => {
                ("113108", "Retain Patient Characteristics Option")
            }
            DeidOption::RetainDeviceIdentity => ("113109", "Retain Device Identity Option"),
            DeidOption::RetainUids => ("113110", "Retain UIDs Option"),
            DeidOption::RetainSafePrivate => ("113111", "Retain Safe Private Option"),
            DeidOption::RetainInstitutionIdentity => {
                ("113112", "Retain Institution Identity Option")
            }
        }
    }
}

/// The code of the Basic Application Level Confidentiality Profile in CID 7050.
pub const BASIC_PROFILE_CODE: (&str, &str) =
    ("113100", "Basic Application Confidentiality Profile");

impl fmt::Display for DeidOption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An option name that is not one of the standard's.
#[derive(Debug, Clone, thiserror::Error)]
#[error("unknown de-identification option `{0}`; the options are: {list}", list = DeidOption::ALL.iter().map(|o| o.name()).collect::<Vec<_>>().join(", "))]
pub struct UnknownOption(pub String);

impl FromStr for DeidOption {
    type Err = UnknownOption;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DeidOption::ALL
            .into_iter()
            .find(|o| o.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| UnknownOption(s.to_string()))
    }
}

/// A validated set of options.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OptionSet {
    options: Vec<DeidOption>,
}

/// Options that cannot be combined.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "options `retain-longitudinal-full-dates` and `retain-longitudinal-modified-dates` exclude each other: choose one"
)]
pub struct ConflictingOptions;

impl OptionSet {
    /// Builds a set; duplicates are ignored, the order is normalised.
    pub fn new(options: impl IntoIterator<Item = DeidOption>) -> Result<Self, ConflictingOptions> {
        let mut options: Vec<DeidOption> = options.into_iter().collect();
        options.sort();
        options.dedup();
        if options.contains(&DeidOption::RetainLongitudinalFullDates)
            && options.contains(&DeidOption::RetainLongitudinalModifiedDates)
        {
            return Err(ConflictingOptions);
        }
        Ok(OptionSet { options })
    }

    pub fn contains(&self, option: DeidOption) -> bool {
        self.options.contains(&option)
    }

    pub fn iter(&self) -> impl Iterator<Item = DeidOption> + '_ {
        self.options.iter().copied()
    }

    pub fn is_empty(&self) -> bool {
        self.options.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_codes_are_distinct() {
        let mut codes = std::collections::HashSet::new();
        for o in DeidOption::ALL {
            assert_eq!(o.name().parse::<DeidOption>().unwrap(), o);
            assert!(codes.insert(o.code().0), "duplicate code for {o}");
        }
        assert!(!codes.contains(BASIC_PROFILE_CODE.0));
        let err = "retain-everything".parse::<DeidOption>().unwrap_err();
        assert!(err.to_string().contains("clean-pixel-data"));
    }

    #[test]
    fn full_and_modified_dates_conflict() {
        assert!(
            OptionSet::new([
                DeidOption::RetainLongitudinalFullDates,
                DeidOption::RetainLongitudinalModifiedDates
            ])
            .is_err()
        );
        let set = OptionSet::new([DeidOption::RetainUids, DeidOption::RetainUids]).unwrap();
        assert_eq!(set.iter().count(), 1);
    }
}
