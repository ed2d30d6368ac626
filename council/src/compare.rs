//! Comparing Council's answer with the plaintext answer: same columns, same
//! types, same rows; exact for integers, decimals and text, and within a
//! relative 1e-9 for floating-point results (VAR, STDDEV, AVG of floats),
//! whose last bits depend on the order of additions.

use arrow::array::{Array, ArrayRef, Float64Array, RecordBatch};
use arrow::compute::concat_batches;
use arrow::datatypes::DataType;
use arrow::util::display::array_value_to_string;

pub const FLOAT_TOLERANCE: f64 = 1e-9;

/// `Ok(())` if the answers agree; otherwise what differs. Rows are compared
/// in order when `ordered`, else as sorted lists.
pub fn compare(secure: &[RecordBatch], plain: &[RecordBatch], ordered: bool) -> Result<(), String> {
    let (Some(s0), Some(p0)) = (secure.first(), plain.first()) else {
        let rows = |b: &[RecordBatch]| b.iter().map(|b| b.num_rows()).sum::<usize>();
        return if rows(secure) == 0 && rows(plain) == 0 {
            Ok(())
        } else {
            Err(format!("{} rows vs {} rows", rows(secure), rows(plain)))
        };
    };
    let s = concat_batches(&s0.schema(), secure).map_err(|e| e.to_string())?;
    let p = concat_batches(&p0.schema(), plain).map_err(|e| e.to_string())?;
    if s.num_columns() != p.num_columns() {
        return Err(format!(
            "{} columns vs {} columns",
            s.num_columns(),
            p.num_columns()
        ));
    }
    for (a, b) in s.schema().fields().iter().zip(p.schema().fields()) {
        if a.name() != b.name() || a.data_type() != b.data_type() {
            return Err(format!(
                "column {} {} vs {} {}",
                a.name(),
                a.data_type(),
                b.name(),
                b.data_type()
            ));
        }
    }
    if s.num_rows() != p.num_rows() {
        return Err(format!("{} rows vs {} rows", s.num_rows(), p.num_rows()));
    }
    let rows = |b: &RecordBatch| -> Vec<Vec<Cell>> {
        let mut rows: Vec<Vec<Cell>> = (0..b.num_rows())
            .map(|r| b.columns().iter().map(|c| cell(c, r)).collect())
            .collect();
        if !ordered {
            rows.sort_by_key(|x| key(x));
        }
        rows
    };
    for (i, (a, b)) in rows(&s).iter().zip(rows(&p)).enumerate() {
        for (j, (x, y)) in a.iter().zip(&b).enumerate() {
            if !x.matches(y) {
                return Err(format!(
                    "row {i}, column {}: {} vs {}",
                    s.schema().field(j).name(),
                    x.text,
                    y.text
                ));
            }
        }
    }
    Ok(())
}

struct Cell {
    text: String,
    float: Option<f64>,
}

impl Cell {
    fn matches(&self, o: &Cell) -> bool {
        match (self.float, o.float) {
            (Some(a), Some(b)) => {
                a == b
                    || (a - b).abs() <= FLOAT_TOLERANCE * a.abs().max(b.abs()).max(1e-300)
                    || (a - b).abs() < 1e-12
            }
            _ => self.text == o.text,
        }
    }
}

fn key(row: &[Cell]) -> Vec<String> {
    // Floats sort by a rounded form so tiny differences do not reorder rows.
    row.iter()
        .map(|c| match c.float {
            Some(f) => format!("{f:.6e}"),
            None => c.text.clone(),
        })
        .collect()
}

fn cell(c: &ArrayRef, r: usize) -> Cell {
    let text = if c.is_null(r) {
        "NULL".to_string()
    } else {
        array_value_to_string(c, r).unwrap_or_default()
    };
    let float = match c.data_type() {
        DataType::Float64 if c.is_valid(r) => c
            .as_any()
            .downcast_ref::<Float64Array>()
            .map(|a| a.value(r)),
        _ => None,
    };
    Cell { text, float }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float64Array, Int64Array, StringArray};
    use arrow::datatypes::{Field, Schema};
    use std::sync::Arc;

    fn batch(g: Vec<&str>, n: Vec<i64>, v: Vec<f64>) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("g", DataType::Utf8, true),
            Field::new("n", DataType::Int64, true),
            Field::new("v", DataType::Float64, true),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(g)),
                Arc::new(Int64Array::from(n)),
                Arc::new(Float64Array::from(v)),
            ],
        )
        .unwrap()
    }

    #[test]
    fn finds_every_kind_of_difference() {
        let a = batch(vec!["a", "b"], vec![1, 2], vec![0.1, 1e6]);
        assert!(compare(std::slice::from_ref(&a), std::slice::from_ref(&a), true).is_ok());
        let rounding = batch(
            vec!["a", "b"],
            vec![1, 2],
            vec![0.1 + 1e-17, 1e6 * (1.0 + 1e-12)],
        );
        assert!(compare(std::slice::from_ref(&a), &[rounding], true).is_ok());
        let off = batch(vec!["a", "b"], vec![1, 3], vec![0.1, 1e6]);
        assert!(compare(std::slice::from_ref(&a), &[off], true)
            .unwrap_err()
            .contains("column n: 2 vs 3"));
        let far = batch(vec!["a", "b"], vec![1, 2], vec![0.1, 1e6 + 1.0]);
        assert!(compare(std::slice::from_ref(&a), &[far], true).is_err());
        let swapped = batch(vec!["b", "a"], vec![2, 1], vec![1e6, 0.1]);
        assert!(compare(
            std::slice::from_ref(&a),
            std::slice::from_ref(&swapped),
            true
        )
        .is_err());
        assert!(compare(std::slice::from_ref(&a), &[swapped], false).is_ok());
        let fewer = batch(vec!["a"], vec![1], vec![0.1]);
        assert!(compare(&[a], &[fewer], true)
            .unwrap_err()
            .contains("2 rows vs 1 rows"));
    }
}
