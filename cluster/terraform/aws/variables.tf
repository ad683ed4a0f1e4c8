variable "region" {
  description = "AWS region of the bucket (and of the pods' AWS_REGION)."
  type        = string
}

variable "bucket_name" {
  description = "Name of the S3 bucket that holds the storage root (globally unique)."
  type        = string
}

variable "prefix" {
  description = "Folder inside the bucket for this platform; the storage root is s3://<bucket>/<prefix>/<environment>."
  type        = string
  default     = "aiplatform"
}

variable "oidc_provider_arn" {
  description = "ARN of the EKS cluster's IAM OIDC provider. Set it to create the IRSA role the pods assume; empty: no role."
  type        = string
  default     = ""
}

variable "service_accounts" {
  description = "Kubernetes ServiceAccounts (namespace/name) allowed to assume the role: those of the overlays."
  type        = list(string)
  default     = ["aiplatform/aiplatform", "aiplatform-dev/aiplatform"]
}

variable "create_iam_user" {
  description = "Also create an IAM user with the same policy, for clusters without IRSA (create its access key yourself: aws iam create-access-key)."
  type        = bool
  default     = false
}

variable "noncurrent_version_days" {
  description = "Days a replaced or deleted object version is kept before it expires."
  type        = number
  default     = 30
}

variable "tags" {
  description = "Tags for every resource."
  type        = map(string)
  default     = { "app.kubernetes.io/part-of" = "aiplatform" }
}
