"""What people read: provenance, label review, the label-budget forecast, reports and pictures."""
