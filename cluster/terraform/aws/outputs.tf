output "storage_root" {
  description = "AIPLATFORM_HOME of an environment: append /dev or /prod (the overlays' settings.env)."
  value       = "s3://${aws_s3_bucket.root.bucket}/${var.prefix}"
}

output "role_arn" {
  description = "IRSA role: the eks.amazonaws.com/role-arn annotation of the aiplatform ServiceAccount (prod overlay)."
  value       = one(aws_iam_role.pods[*].arn)
}

output "iam_user" {
  description = "IAM user for clusters without IRSA (create its key: aws iam create-access-key --user-name ...)."
  value       = one(aws_iam_user.pods[*].name)
}

output "policy_arn" {
  description = "The policy scoped to the storage root."
  value       = aws_iam_policy.access.arn
}
