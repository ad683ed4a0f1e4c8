output "storage_root" {
  description = "AIPLATFORM_HOME of an environment: append /dev or /prod (the overlays' settings.env)."
  value       = "gs://${google_storage_bucket.root.name}/${var.prefix}"
}

output "service_account_email" {
  description = "The iam.gke.io/gcp-service-account annotation of the aiplatform ServiceAccount."
  value       = google_service_account.pods.email
}
